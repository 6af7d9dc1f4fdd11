"""Visible checks that say what they computed, and candidate runs that keep the failing frame's locals.

`instrument(tests)` and `instrument_candidate(code)` return Python source to execute in the kernel
namespace. The kernel side is `_RUNTIME` below: it is compiled there under the file name
`<loopbook>` inside a throwaway function, so no helper name is left in the user's namespace and its
frames are easy to tell from the candidate's. The same runtime is loaded here too, so
`locals_of_failure` is the very function the kernel runs.

Reports come back as one stdout line `__LOOPBOOK_CHECKS__ <json>` (read it with
`parse_check_output`) and, for a candidate that raised, one stderr line `__LOOPBOOK_LOCALS__ <json>`
(read it with `parse_locals_output`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields

CHECKS_MARK = "__LOOPBOOK_CHECKS__"
LOCALS_MARK = "__LOOPBOOK_LOCALS__"
RUNTIME_FILENAME = "<loopbook>"
CANDIDATE_PREFIX = "<solution"

# Runs in the kernel. Self-contained: the kernel cannot import this package.
_RUNTIME = r'''
import ast, json, linecache, operator, os, reprlib, sys, sysconfig, traceback, types

CHECKS_MARK = "__LOOPBOOK_CHECKS__"
LOCALS_MARK = "__LOOPBOOK_LOCALS__"
VALUE_CHARS = 300
LOCAL_CHARS = 200
MAX_LOCALS = 20
HIDDEN_NAMES = {"In", "Out", "exit", "quit", "get_ipython"}
SETUP_NODES = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef,
               ast.Assign, ast.AnnAssign, ast.AugAssign, ast.Pass)
OPS = {ast.Eq: ("==", operator.eq), ast.NotEq: ("!=", operator.ne), ast.Lt: ("<", operator.lt),
       ast.LtE: ("<=", operator.le), ast.Gt: (">", operator.gt), ast.GtE: (">=", operator.ge),
       ast.Is: ("is", operator.is_), ast.IsNot: ("is not", operator.is_not),
       ast.In: ("in", lambda a, b: a in b), ast.NotIn: ("not in", lambda a, b: a not in b)}
# The comparison seen from the side holding the call, when the call is on the right.
FLIP = {"<": ">", "<=": ">=", ">": "<", ">=": "<=", "in": "contains", "not in": "not contains"}


def _lib_dirs():
    import site
    dirs = [sysconfig.get_paths().get(k) for k in ("stdlib", "platstdlib", "purelib", "platlib")]
    try:
        dirs += site.getsitepackages() + [site.getusersitepackages()]
    except Exception:  # some embedded interpreters lack these
        pass
    return tuple(sorted({os.path.normcase(os.path.realpath(d)) for d in dirs if d}))


_LIB_DIRS = _lib_dirs()


def safe_repr(value, limit=VALUE_CHARS):
    """repr() that never raises, with long results cut in the middle."""
    try:
        if isinstance(value, (list, tuple, set, frozenset, dict)) and len(value) > 10000:
            r = reprlib.Repr()
            r.maxlist = r.maxtuple = r.maxset = r.maxfrozenset = r.maxdict = 50
            r.maxstring = r.maxother = limit
            text = r.repr(value)
        else:
            text = repr(value)
    except BaseException as e:  # a broken __repr__ must not hide the real failure
        text = "<%s object; repr() raised %s>" % (type(value).__name__, type(e).__name__)
    if len(text) > limit:
        keep = max(limit - 5, 10)
        text = text[: keep * 2 // 3] + " ... " + text[-(keep - keep * 2 // 3):]
    return text


def is_user_file(filename, exclude=()):
    """True for code the user (or the model) wrote: not ours, not the tests, not the stdlib or site-packages."""
    if filename in exclude or filename == "<loopbook>" or filename.startswith("<frozen "):
        return False
    if filename.startswith("<"):
        return True  # <solution-...>, <string>, <stdin>: code compiled from text
    if not os.path.isabs(filename) and not os.path.isfile(filename):
        return False  # compiled extensions (Cython) record paths relative to their package
    path = os.path.normcase(os.path.realpath(filename))
    return not any(path == d or path.startswith(d + os.sep) for d in _LIB_DIRS)


def _innermost_user_tb(tb, exclude=()):
    found = None
    while tb is not None:
        if is_user_file(tb.tb_frame.f_code.co_filename, exclude):
            found = tb
        tb = tb.tb_next
    return found


def _frame_locals(frame, limit=LOCAL_CHARS):
    module_level = frame.f_code.co_name == "<module>"
    # At module level f_locals is the whole namespace: keep the names this code touches.
    wanted = set(frame.f_code.co_names) | set(frame.f_code.co_varnames) if module_level else None
    out = {}
    for name, value in list(frame.f_locals.items()):
        if name.startswith("__") or name in HIDDEN_NAMES or (wanted is not None and name not in wanted):
            continue
        if isinstance(value, (types.ModuleType, types.FunctionType, types.BuiltinFunctionType, type)):
            continue
        out[name] = safe_repr(value, limit)
        if len(out) >= MAX_LOCALS:
            break
    return out


def locals_of_failure(exc, exclude=()):
    """The trimmed locals of the innermost frame of the exception that belongs to user code ({} if none)."""
    tb = _innermost_user_tb(exc.__traceback__, exclude)
    return {} if tb is None else _frame_locals(tb.tb_frame)


def error_report(exc, exclude=()):
    """ename, evalue, the traceback frames inside user code, and the failing frame's locals."""
    frames = [fs for fs in traceback.extract_tb(exc.__traceback__) if is_user_file(fs.filename, exclude)]
    tb = _innermost_user_tb(exc.__traceback__, exclude)
    return {
        "ename": type(exc).__name__,
        "evalue": safe_repr_text(exc),
        "traceback": [line.rstrip("\n") for line in traceback.StackSummary.from_list(frames).format()],
        "function": tb.tb_frame.f_code.co_name if tb else None,
        "line": tb.tb_lineno if tb else None,
        "locals": _frame_locals(tb.tb_frame) if tb else {},
    }


def safe_repr_text(exc, limit=500):
    try:
        text = str(exc)
    except BaseException:
        text = "<str() of the exception failed>"
    return text if len(text) <= limit else text[: limit - 4] + " ..."


def _register_source(filename, src):
    linecache.cache[filename] = (len(src), None, src.splitlines(True), filename)


def run_candidate(src, ns, filename):
    """Run candidate code in ns as a cell would; on an exception print the failing frame's locals, re-raise."""
    __tracebackhide__ = True
    _register_source(filename, src)
    tree = ast.parse(src, filename)
    last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
    try:
        exec(compile(tree, filename, "exec", dont_inherit=True), ns)
        if last is not None:  # shown like a cell's last expression
            exec(compile(ast.Interactive([last]), filename, "single", dont_inherit=True), ns)
    except BaseException as exc:
        try:
            tb = _innermost_user_tb(exc.__traceback__)
            if tb is not None:
                info = {"ename": type(exc).__name__, "function": tb.tb_frame.f_code.co_name,
                        "line": tb.tb_lineno, "locals": _frame_locals(tb.tb_frame)}
                if isinstance(exc, AssertionError):
                    explained = _explain_own_assert(exc, src, filename)
                    if explained is not None:
                        info["check"] = explained
                sys.stderr.write("\n" + LOCALS_MARK + " " + json.dumps(info) + "\n")
                sys.stderr.flush()
        except BaseException:
            pass
        raise


def _explain_own_assert(exc, src, filename):
    """What a failing assert in the answer's own code computed ("`f(2)` returned 3, expected 4"), like a check."""
    tree = ast.parse(src, filename)  # afresh: run_candidate took the last expression out of its tree
    top = None
    tb = exc.__traceback__
    while tb is not None:  # the answer's module-level frame: which of its statements was running
        if tb.tb_frame.f_code.co_filename == filename and tb.tb_frame.f_code.co_name == "<module>":
            top = tb.tb_lineno
        tb = tb.tb_next
    if top is None:
        return None
    stmt = next((s for s in tree.body if s.lineno <= top <= (s.end_lineno or s.lineno)), None)
    if stmt is None:
        return None
    try:
        failure = _explain_exception(exc, stmt, tree, src, filename)
    except Exception:
        return None
    return failure if failure and (failure.get("got") is not None or failure.get("message")) else None


# ---- checks ----

class _PartError(Exception):
    """A part of an assert raised; node is that part (None: the comparison itself raised)."""

    def __init__(self, node, exc):
        super().__init__()
        self.node, self.exc = node, exc


def _has_call(node):
    return any(isinstance(n, ast.Call) for n in ast.walk(node))


def _orient(a, b):
    """(call side, expected side, swapped): the side that calls something is what was computed."""
    if not _has_call(a) and _has_call(b):
        return b, a, True
    return a, b, False


class _Rename(ast.NodeTransformer):
    """Renames names (check(candidate) -> the real function) and, inside call arguments, shows values."""

    def __init__(self, names, values):
        self.names, self.values, self.in_args = names or {}, values or {}, False

    def visit_Name(self, node):
        if self.in_args and node.id in self.values:
            return ast.copy_location(ast.Name(self.values[node.id], node.ctx), node)
        if node.id in self.names:
            return ast.copy_location(ast.Name(self.names[node.id], node.ctx), node)
        return node

    def visit_Call(self, node):
        outer = self.in_args
        node.func = self.visit(node.func)
        self.in_args = True
        node.args = [self.visit(a) for a in node.args]
        node.keywords = [self.visit(k) for k in node.keywords]
        self.in_args = outer
        return node


def _segment(src, node, subst=None, values=None):
    if node is None:
        return None
    names = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
    if names & set(subst or ()) or names & set(values or ()):
        import copy
        return ast.unparse(_Rename(subst, values).visit(copy.deepcopy(node)))
    return ast.get_source_segment(src, node) or ast.unparse(node)


_SIMPLE = (str, int, float, complex, bool, bytes, type(None))
_SCOPES = (ast.Lambda, ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)


def _arg_values(node, lookup):
    """Short reprs of immutable values named in call arguments, so `f(s)` in a loop reads `f('ab')`."""
    out = {}
    for call in ast.walk(node):
        if not isinstance(call, ast.Call):
            continue
        for arg in list(call.args) + [k.value for k in call.keywords]:
            if any(isinstance(n, _SCOPES) for n in ast.walk(arg)):
                continue  # names bound inside a comprehension are not the outer ones
            for n in ast.walk(arg):
                if isinstance(n, ast.Name) and n.id not in out:
                    try:
                        value = lookup(n.id)
                    except Exception:
                        continue
                    simple = isinstance(value, _SIMPLE) or (
                        isinstance(value, tuple) and len(value) <= 10 and all(isinstance(v, _SIMPLE) for v in value))
                    text = repr(value) if simple else ""
                    if simple and len(text) <= 60:
                        out[n.id] = text
    return out


def _approx_parts(test):
    """(a, b, tol, op) for `abs(a - b) < tol` / `<=`, either way round; else None."""
    if (isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], (ast.Lt, ast.LtE))
            and isinstance(test.left, ast.Call) and isinstance(test.left.func, ast.Name)
            and test.left.func.id == "abs" and len(test.left.args) == 1 and not test.left.keywords
            and isinstance(test.left.args[0], ast.BinOp) and isinstance(test.left.args[0].op, ast.Sub)):
        diff = test.left.args[0]
        return diff.left, diff.right, test.comparators[0], test.ops[0]
    return None


def _is_isclose(test):
    if not isinstance(test, ast.Call) or len(test.args) < 2 or any(isinstance(a, ast.Starred) for a in test.args):
        return False
    f = test.func
    name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
    return name == "isclose" and all(k.arg for k in test.keywords)


def _decomposable(test):
    """A predicate call like isinstance(f(x), list) whose arguments can be evaluated one by one."""
    simple = lambda a: not isinstance(a, (ast.Starred, ast.GeneratorExp, ast.ListComp, ast.SetComp,
                                          ast.DictComp, ast.Lambda))
    return (isinstance(test, ast.Call) and all(simple(a) for a in test.args)
            and all(k.arg and simple(k.value) for k in test.keywords)
            and any(_has_call(a) for a in test.args))


class _Explain:
    """Evaluates an assert's parts once each and records what they computed."""

    def __init__(self, stmt, ev, src, exclude, lookup, subst=None):
        self.stmt, self.ev, self.src, self.exclude, self.subst = stmt, ev, src, exclude, subst
        self.values = _arg_values(stmt.test, lookup)
        self.f = {"source": _segment(src, stmt, subst), "call": self.seg(stmt.test),
                  "got": None, "expected": None, "op": "truthy", "error": None}
        self.pending_expected = None

    def seg(self, node):
        """Source of the computed part, with argument values shown (the source field keeps the text as written)."""
        return _segment(self.src, node, self.subst, self.values)

    def val(self, node):
        try:
            return self.ev(node)
        except KeyboardInterrupt:
            raise
        except BaseException as e:
            raise _PartError(node, e)

    def got(self, value):
        self.f["got"] = safe_repr(value)
        self.f["got_type"] = type(value).__name__

    def expected(self, value):
        self.f["expected"] = safe_repr(value)
        self.f["expected_type"] = type(value).__name__
        self.pending_expected = None

    def run(self):
        """The failure dict, or None when the assert holds."""
        try:
            ok = self.evaluate(self.stmt.test)
        except _PartError as pe:
            if pe.node is not None:
                self.f["call"] = self.seg(pe.node)
            self.f["error"] = error_report(pe.exc, self.exclude)
            node = self.pending_expected
            if node is not None and node is not pe.node and not _has_call(node):
                try:
                    self.expected(self.ev(node))
                except Exception:
                    pass
            return self.f
        if ok:
            return None
        if self.stmt.msg is not None:
            try:
                self.f["message"] = safe_repr_text(self.ev(self.stmt.msg))
            except Exception:
                pass
        return self.f

    def truth(self, value):
        try:
            return bool(value)
        except Exception as e:
            raise _PartError(None, e)

    def holds(self, compute):
        """truth() of what compute() returns; an exception in either is the check's error."""
        try:
            value = compute()
        except Exception as e:
            raise _PartError(None, e)
        return self.truth(value)

    def evaluate(self, test):
        approx = _approx_parts(test)
        if approx is not None:
            a_node, b_node, tol_node, op = approx
            call, exp, _ = _orient(a_node, b_node)
            self.f.update(call=self.seg(call), op="approx", tolerance=self.seg(tol_node))
            self.pending_expected = exp
            a, b = self.val(a_node), self.val(b_node)
            self.got(a if call is a_node else b)
            self.expected(b if call is a_node else a)
            tol = self.val(tol_node)
            return self.holds(lambda: abs(a - b) < tol if isinstance(op, ast.Lt) else abs(a - b) <= tol)
        if isinstance(test, ast.Compare):
            nodes = [test.left] + list(test.comparators)
            call, exp, _ = _orient(nodes[0], nodes[1])
            self.f.update(call=self.seg(call), op=OPS[type(test.ops[0])][0])
            self.pending_expected = exp
            left = self.val(nodes[0])
            for i, op in enumerate(test.ops):
                right = self.val(nodes[i + 1])
                symbol, fn = OPS[type(op)]
                if not self.holds(lambda: fn(left, right)):
                    call, exp, swapped = _orient(nodes[i], nodes[i + 1])
                    self.f.update(call=self.seg(call), op=FLIP.get(symbol, symbol) if swapped else symbol)
                    self.got(right if swapped else left)
                    self.expected(left if swapped else right)
                    return False
                left = right
            return True
        if _is_isclose(test):
            call, exp, _ = _orient(test.args[0], test.args[1])
            tol = ", ".join(self.seg(k) for k in test.keywords)
            self.f.update(call=self.seg(call), op="approx", tolerance=tol or "math.isclose defaults")
            self.pending_expected = exp
            fn = self.val(test.func)
            args = [self.val(a) for a in test.args]
            kwargs = {k.arg: self.val(k.value) for k in test.keywords}
            self.got(args[0] if call is test.args[0] else args[1])
            self.expected(args[1] if call is test.args[0] else args[0])
            return self.holds(lambda: fn(*args, **kwargs))
        if isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
            self.f.update(call=self.seg(test.operand), op="falsy")
            value = self.val(test.operand)
            self.got(value)
            return not self.truth(value)
        if _decomposable(test):
            fn = self.val(test.func)
            args = [self.val(a) for a in test.args]
            kwargs = {k.arg: self.val(k.value) for k in test.keywords}
            i = next(i for i, a in enumerate(test.args) if _has_call(a))
            self.f.update(call=self.seg(test.args[i]), op="truthy", predicate=self.seg(test))
            self.got(args[i])
            try:
                result = fn(*args, **kwargs)
            except Exception as e:
                raise _PartError(test, e)
            self.f["predicate_value"] = safe_repr(result)
            return self.truth(result)
        value = self.val(test)
        self.got(value)
        return self.truth(value)


def _compile_expr(node, filename):
    expr = ast.Expression(node)
    ast.fix_missing_locations(expr)
    return compile(expr, filename, "eval", dont_inherit=True)


def _innermost_stmt(tree, line):
    best = None
    for node in ast.walk(tree):
        if isinstance(node, ast.stmt) and node.lineno <= line <= (node.end_lineno or node.lineno):
            if best is None or (node.end_lineno - node.lineno) <= (best.end_lineno - best.lineno):
                best = node
    return best


def _node_at_instruction(stmt, tb):
    """The Call node in stmt that the traceback's instruction belongs to (Python 3.11 positions)."""
    try:
        pos = list(tb.tb_frame.f_code.co_positions())[tb.tb_lasti // 2]
    except Exception:
        return None
    calls = [n for n in ast.walk(stmt) if isinstance(n, ast.Call)]
    for n in calls:
        if (n.lineno, n.end_lineno, n.col_offset, n.end_col_offset) == tuple(pos):
            return n
    return None


def _substitutions(frame):
    """Parameter names bound to named functions (check(candidate) -> the real name) for readable sources."""
    if frame.f_code.co_name == "<module>":
        return {}
    out = {}
    for name, value in frame.f_locals.items():
        real = getattr(value, "__name__", None)
        if (callable(value) and isinstance(real, str) and real.isidentifier() and real != name
                and not isinstance(value, type)):
            out[name] = real
    return out


def _explain_exception(exc, stmt, tree, src, filename):
    f = {"source": _segment(src, stmt), "call": None, "got": None, "expected": None, "op": None, "error": None}
    checks_tb, tb = None, exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == filename:
            checks_tb = tb
        tb = tb.tb_next
    if checks_tb is None:
        f["error"] = error_report(exc, (filename,))
        return f
    frame = checks_tb.tb_frame
    inner = _innermost_stmt(tree, checks_tb.tb_lineno) or stmt
    subst = _substitutions(frame)
    ctx = dict(frame.f_globals)
    ctx.update(frame.f_locals)
    ev = lambda node: eval(_compile_expr(node, filename), ctx)
    raised_here = checks_tb.tb_next is None
    if isinstance(inner, ast.Assert) and isinstance(exc, AssertionError) and raised_here:
        # A nested assert (inside check(candidate), a loop, ...) failed: re-evaluate its parts once.
        result = _Explain(inner, ev, src, (filename,), ctx.__getitem__, subst).run()
        if result is None:
            result = {"source": _segment(src, inner, subst), "call": _segment(src, inner.test, subst),
                      "got": None, "expected": None, "op": "truthy", "error": None,
                      "message": "failed, but held when evaluated again (the result changes between calls)"}
        return result
    f["source"] = _segment(src, inner, subst)
    if raised_here and isinstance(exc, AssertionError):
        f["message"] = safe_repr_text(exc) or "AssertionError"  # raise AssertionError(...) in the tests
        f["call"] = _segment(src, _node_at_instruction(inner, checks_tb), subst)
        return f
    node = _node_at_instruction(inner, checks_tb)
    f["call"] = _segment(src, node, subst, _arg_values(node, ctx.__getitem__) if node is not None else None)
    f["error"] = error_report(exc, (filename,))
    if isinstance(inner, ast.Assert) and isinstance(inner.test, ast.Compare) and node is not None:
        sides = [inner.test.left, inner.test.comparators[0]]
        if node in sides:
            other = sides[1] if node is sides[0] else sides[0]
            f["op"] = OPS[type(inner.test.ops[0])][0]
            if not _has_call(other):
                try:
                    f["expected"] = safe_repr(ev(other))
                except Exception:
                    pass
    return f


def _run_statement(stmt, tree, src, ns, filename):
    if isinstance(stmt, ast.Assert):
        ev = lambda node: eval(_compile_expr(node, filename), ns)
        return _Explain(stmt, ev, src, (filename,), ns.__getitem__).run()
    module = ast.Module([stmt], [])
    try:
        exec(compile(module, filename, "exec", dont_inherit=True), ns)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:
        return _explain_exception(exc, stmt, tree, src, filename)
    return None


def run_checks(src, ns, filename="<checks>"):
    """Run each top-level statement of src in ns, stop at the first failure, print the report line."""
    report = {"passed": 0, "total": 0, "failures": []}
    try:
        try:
            tree = ast.parse(src, filename)
        except SyntaxError as e:
            report["failures"].append({"source": (e.text or "").strip(), "call": None, "got": None,
                                       "expected": None, "op": None, "message": "the tests do not parse",
                                       "error": {"ename": "SyntaxError", "evalue": str(e), "traceback": [],
                                                 "function": None, "line": e.lineno, "locals": {}}})
            return report
        _register_source(filename, src)
        report["total"] = sum(not isinstance(s, SETUP_NODES) for s in tree.body)
        for stmt in tree.body:
            failure = _run_statement(stmt, tree, src, ns, filename)
            if failure is not None:
                report["failures"].append(failure)
                break
            if not isinstance(stmt, SETUP_NODES):
                report["passed"] += 1
    except KeyboardInterrupt:
        report["interrupted"] = True
        raise
    finally:
        try:
            sys.stdout.flush()
        except Exception:
            pass
        sys.stdout.write("\n" + CHECKS_MARK + " " + json.dumps(report, default=str) + "\n")
        sys.stdout.flush()
    return report
'''

# The blank lines keep the long runtime line out of the context IPython prints around a failing line.
_SNIPPET = '''\
def {fn}():
    __tracebackhide__ = True
    rt = {{"__name__": "__loopbook__"}}
    exec(compile({runtime!r}, "<loopbook>", "exec", dont_inherit=True), rt)
    rt[{entry!r}]({payload!r}, globals(), {filename!r})




try:
    {fn}()
finally:
    del {fn}
'''

_rt: dict = {"__name__": "__loopbook__"}
exec(compile(_RUNTIME, RUNTIME_FILENAME, "exec", dont_inherit=True), _rt)


def instrument(tests: str, *, filename: str = "<checks>") -> str:
    """Python source that runs `tests` statement by statement in the kernel namespace and prints the report line.

    Run it after the candidate code, in the same namespace. It raises nothing (except an interrupt).
    """
    try:
        compile(tests, filename, "exec", dont_inherit=True)  # also catches what ast.parse lets through
    except SyntaxError as e:
        raise ValueError(f"the tests do not parse: line {e.lineno}: {e.msg}; fix the tests before running them") from None
    return _SNIPPET.format(fn="__loopbook_checks__", runtime=_RUNTIME, entry="run_checks", payload=tests,
                           filename=filename)


def candidate_filename(code: str) -> str:
    """The file name the candidate's frames carry: one per distinct code, so old functions keep their lines."""
    return f"{CANDIDATE_PREFIX}-{hashlib.sha1(code.encode('utf-8', 'surrogatepass')).hexdigest()[:8]}>"


def instrument_candidate(code: str, *, filename: str | None = None) -> str:
    """Python source that runs `code` in the kernel namespace as a cell would.

    On an exception it prints `__LOOPBOOK_LOCALS__ {"ename", "function", "line", "locals"}` on stderr
    and re-raises the exception unchanged. A SyntaxError in `code` is raised as is (check it compiles first).
    """
    return _SNIPPET.format(fn="__loopbook_run__", runtime=_RUNTIME, entry="run_candidate", payload=code,
                           filename=filename or candidate_filename(code))


def locals_of_failure(exc: BaseException) -> dict:
    """Trimmed reprs of the locals of the innermost frame of `exc` that is user code, not a library ({} if none)."""
    return _rt["locals_of_failure"](exc)


def error_report(exc: BaseException) -> dict:
    """{"ename", "evalue", "traceback": user frames, "function", "line", "locals"} for an exception."""
    return _rt["error_report"](exc)


@dataclass
class CheckFailure:
    """One failing check: what ran, what it computed, what was expected, or what it raised."""

    source: str
    call: str | None = None
    got: str | None = None
    expected: str | None = None
    op: str | None = None
    error: dict | None = None
    message: str | None = None
    tolerance: str | None = None
    predicate: str | None = None
    predicate_value: str | None = None
    got_type: str | None = None
    expected_type: str | None = None

    @classmethod
    def from_dict(cls, d: dict) -> "CheckFailure":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class CheckReport:
    """How many checks passed out of how many, and the (first) failure."""

    passed: int
    total: int
    failures: list[CheckFailure] = field(default_factory=list)
    interrupted: bool = False

    @property
    def ok(self) -> bool:
        return not self.failures and not self.interrupted and self.passed == self.total

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "CheckReport":
        return cls(passed=int(d.get("passed", 0)), total=int(d.get("total", 0)),
                   failures=[CheckFailure.from_dict(f) for f in d.get("failures") or []],
                   interrupted=bool(d.get("interrupted", False)))


def _take_marked(text: str, mark: str) -> tuple[dict | None, str]:
    """The JSON after the last `mark` line, and the text with every marked line (and the newline we put before it) removed."""
    found = None
    out = []
    pos = 0
    while True:
        i = text.find(mark + " ", pos)
        if i < 0:
            out.append(text[pos:])
            break
        end = text.find("\n", i)
        end = len(text) if end < 0 else end
        before = text[pos:i]
        if before.endswith("\n"):
            before = before[:-1]
        out.append(before)
        try:
            found = json.loads(text[i + len(mark) + 1:end])
        except ValueError:
            pass
        pos = end + 1 if end < len(text) else end
    return found, "".join(out)


def parse_check_output(stdout_text: str) -> tuple[CheckReport | None, str]:
    """(the report from the last `__LOOPBOOK_CHECKS__` line or None, stdout without that line)."""
    data, rest = _take_marked(stdout_text or "", CHECKS_MARK)
    return (CheckReport.from_dict(data) if isinstance(data, dict) else None), rest


def parse_locals_output(stderr_text: str) -> tuple[dict | None, str]:
    """({"ename", "function", "line", "locals"} from a `__LOOPBOOK_LOCALS__` line or None, stderr without it)."""
    data, rest = _take_marked(stderr_text or "", LOCALS_MARK)
    return (data if isinstance(data, dict) else None), rest
