"""Runs inside a dialog's kernel for kernels.namespace: trimmed summaries of values, tool schemas and calls.

kernels.namespace sends this file's source to the kernel, where it lives as the module
`_loopbook_probe` in sys.modules, so the user's namespace gets no new names. Each entry point takes
and returns JSON text. Standard library only; pandas and numpy are used only when a value is theirs.
"""

import builtins
import contextlib
import enum
import inspect
import json
import re
import reprlib
import signal
import sys
import threading
import traceback
import types
import typing

ERROR_FRAMES = 5  # the last frames of a tool's traceback that come back with its error


class TimeLimit(BaseException):
    """An item ran past its time limit (a BaseException, so the user's `except Exception` lets it by)."""


@contextlib.contextmanager
def time_limit(seconds):
    """Raise TimeLimit in this thread after `seconds` (SIGALRM; only where signals reach: the main thread)."""
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(signum, frame):
        raise TimeLimit()

    old_handler = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        while True:  # the alarm may fire while we cancel it; the work is done either way
            try:
                signal.setitimer(signal.ITIMER_REAL, 0)
                break
            except TimeLimit:
                continue
        signal.signal(signal.SIGALRM, old_handler)


def user_namespace():
    try:
        from IPython import get_ipython

        shell = get_ipython()
        if shell is not None:
            return shell.user_ns
    except ImportError:
        pass
    return sys.modules["__main__"].__dict__


_MISSING = object()


def resolve(name):
    """The value of a name or dotted attribute path in the user's namespace, or _MISSING and why."""
    ns = user_namespace()
    first, *rest = name.split(".")
    if first in ns:
        value = ns[first]
    elif hasattr(builtins, first):
        value = getattr(builtins, first)
    else:
        return _MISSING, f"`{first}` is not defined in the kernel (run the cell that defines it first)"
    path = first
    for attr in rest:
        try:
            value = getattr(value, attr)
        except AttributeError:
            return _MISSING, f"`{path}` ({type_name(value)}) has no attribute `{attr}`"
        path += "." + attr
    return value, None


def type_name(value):
    cls = type(value)
    module = getattr(cls, "__module__", "") or ""
    if module == "builtins":
        return cls.__qualname__
    # pandas.core.frame.DataFrame reads better as pandas.DataFrame
    return f"{module.split('.')[0]}.{cls.__qualname__}" if module else cls.__qualname__


def clip(text, limit):
    if len(text) <= limit:
        return text
    half = max((limit - 40) // 2, 1)
    return f"{text[:half]}\n... [{len(text) - 2 * half:,} characters omitted] ...\n{text[-half:]}"


def _short_repr():
    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxtuple, r.maxset, r.maxfrozenset, r.maxdeque = 3, 8, 8, 8, 8, 8
    r.maxdict, r.maxstring, r.maxlong, r.maxother = 8, 120, 60, 160
    return r


SHORT = _short_repr()


def describe(value, limit=2000):
    """A trimmed, helpful text for a value: shape and head of tables and arrays, length and a few items."""
    for summarize in (_dataframe, _series, _ndarray, _text, _mapping, _collection):
        text = summarize(value, limit)
        if text is not None:
            return clip(text, limit)
    return clip(repr(value), limit)


def _from(value, module, name):
    cls = type(value)
    return cls.__name__ == name and (getattr(cls, "__module__", "") or "").split(".")[0] == module


def _dataframe(value, limit):
    if not _from(value, "pandas", "DataFrame"):
        return None
    rows, cols = value.shape
    dtypes = [f"{c} ({t})" for c, t in list(value.dtypes.items())[:40]]
    more = f", ... and {cols - 40} more" if cols > 40 else ""
    head = value.head(5).to_string(max_cols=20, max_colwidth=40, show_dimensions=False)
    return (f"pandas DataFrame, {rows:,} rows x {cols:,} columns\ncolumns (dtype): {', '.join(dtypes)}{more}\n"
            f"head:\n{head}")


def _series(value, limit):
    if not _from(value, "pandas", "Series"):
        return None
    name = f" {value.name!r}" if value.name is not None else ""
    head = value.head(5).to_string(max_rows=5)
    return f"pandas Series{name}, {len(value):,} values, dtype {value.dtype}\nhead:\n{head}"


def _ndarray(value, limit):
    if not _from(value, "numpy", "ndarray"):
        return None
    import numpy

    body = numpy.array2string(value, threshold=30, edgeitems=3, max_line_width=100)
    return f"numpy array, shape {value.shape}, dtype {value.dtype}\n{body}"


def _text(value, limit):
    if not isinstance(value, (str, bytes, bytearray)):
        return None
    text = repr(value)
    if len(text) <= min(limit, 200):
        return text
    kind = "characters" if isinstance(value, str) else "bytes"
    n = max(min(limit // 3, 300), 20)
    return f"{type(value).__name__} of {len(value):,} {kind}: {value[:n]!r} ... {value[-n // 2:]!r}"


def _mapping(value, limit):
    if not isinstance(value, dict):
        return None
    text = repr(value)
    if len(text) <= min(limit, 200):
        return text
    items = [f"{SHORT.repr(k)}: {SHORT.repr(v)}" for k, v in _first(value.items(), 5)]
    more = ", ..." if len(value) > len(items) else ""
    return f"{type_name(value)} of {len(value):,} items: {{{', '.join(items)}{more}}}"


def _collection(value, limit):
    if not isinstance(value, (list, tuple, set, frozenset)) and type_name(value) != "collections.deque":
        return None
    text = repr(value)
    if len(text) <= min(limit, 200):
        return text
    return f"{type_name(value)} of {len(value):,} items: {SHORT.repr(value)}"


def _first(iterable, n):
    out = []
    for item in iterable:
        if len(out) == n:
            break
        out.append(item)
    return out


def _error_text(exc):
    return f"{type(exc).__name__}: {clip(str(exc), 500)}"


# -- entry points ---------------------------------------------------------------------------------


def variables(names_json, limit, seconds):
    """Per name: {"name", "status": ok|missing|error|timeout, "type", "text"}."""
    out = []
    for name in json.loads(names_json):
        value, why = resolve(name)
        if value is _MISSING:
            out.append({"name": name, "status": "missing", "type": None, "text": why})
            continue
        kind = type_name(value)
        try:
            with time_limit(seconds):
                text = describe(value, limit)
            out.append({"name": name, "status": "ok", "type": kind, "text": text})
        except TimeLimit:
            text = f"summarizing `{name}` ({kind}) took over {seconds:g} s, so it was stopped"
            out.append({"name": name, "status": "timeout", "type": kind, "text": text})
        except Exception as exc:
            text = f"`{name}` ({kind}) could not be shown: its repr raised {_error_text(exc)}"
            out.append({"name": name, "status": "error", "type": kind, "text": text})
    return json.dumps(out)


def tool_specs(names_json, limit):
    """Per name: {"name", "status": ok|missing|error, "spec": {"name", "description", "parameters"}, "text"}."""
    out = []
    for name in json.loads(names_json):
        fn, why = resolve(name)
        if fn is _MISSING:
            out.append({"name": name, "status": "missing", "spec": None, "text": why})
            continue
        try:
            out.append({"name": name, "status": "ok", "spec": tool_spec(name, fn, limit), "text": None})
        except Exception as exc:
            out.append({"name": name, "status": "error", "spec": None, "text": str(exc)})
    return json.dumps(out)


def tool_spec(name, fn, limit):
    if not callable(fn):
        raise TypeError(f"`{name}` is a {type_name(fn)}, not a function, so it cannot be a tool")
    if inspect.iscoroutinefunction(fn):
        raise TypeError(f"`{name}` is an async function; tools must be plain functions for now")
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"`{name}` has no signature Python can read ({exc}), so its parameters are unknown")
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # an annotation that does not resolve: use the raw ones
        hints = {}
    doc = inspect.getdoc(fn) or ""
    notes = param_docs(doc)
    properties, required = {}, []
    extra = False
    for p in sig.parameters.values():
        if p.kind is p.VAR_POSITIONAL:
            continue  # JSON arguments are by name
        if p.kind is p.VAR_KEYWORD:
            extra = True
            continue
        schema = json_schema(hints.get(p.name, p.annotation))
        if p.name in notes:
            schema["description"] = notes[p.name]
        if p.default is p.empty:
            required.append(p.name)
        elif _is_json(p.default):
            schema["default"] = p.default
        properties[p.name] = schema
    parameters = {"type": "object", "properties": properties, "required": required}
    if not extra:
        parameters["additionalProperties"] = False
    summary = doc.split("\n\n")[0].strip() if doc else ""
    description = clip(doc if len(doc) <= limit else summary, limit) or f"The function {name}{sig}."
    return {"name": name, "description": description, "parameters": parameters}


_SCALARS = {int: "integer", float: "number", str: "string", bool: "boolean", bytes: "string", type(None): "null"}
_BY_NAME = {"int": "integer", "float": "number", "str": "string", "bool": "boolean", "list": "array",
            "dict": "object", "None": "null"}


def json_schema(tp):
    """A JSON schema for a Python annotation; {} (any value) where there is none or it says nothing JSON can."""
    if tp is inspect.Parameter.empty or tp is typing.Any:
        return {}
    if tp is None:
        return {"type": "null"}
    if isinstance(tp, str):
        base = tp.split("[")[0].strip()
        return {"type": _BY_NAME[base]} if base in _BY_NAME else {}
    if isinstance(tp, type) and tp in _SCALARS:
        return {"type": _SCALARS[tp]}
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union or (hasattr(types, "UnionType") and isinstance(tp, types.UnionType)):
        options = [json_schema(a) for a in args]
        return {} if any(o == {} for o in options) else {"anyOf": options}
    if origin is typing.Literal:
        return {"enum": [a for a in args if _is_json(a)]}
    if origin in (list, tuple, set, frozenset) or tp in (list, tuple, set, frozenset) or _is_abc(origin, "Sequence"):
        items = [a for a in args if a is not Ellipsis]
        schema = {"type": "array"}
        if len(set(items)) == 1:
            schema["items"] = json_schema(items[0])
        return schema
    if origin is dict or tp is dict or _is_abc(origin, "Mapping"):
        schema = {"type": "object"}
        if len(args) == 2 and json_schema(args[1]):
            schema["additionalProperties"] = json_schema(args[1])
        return schema
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return {"enum": [m.value for m in tp if _is_json(m.value)]}
    return {}


def _is_abc(origin, name):
    return origin is not None and getattr(origin, "__module__", "") == "collections.abc" and origin.__name__ == name


def _is_json(value):
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


_GOOGLE_ARGS = re.compile(r"^(?:Args|Arguments|Parameters|Params):\s*$")
_GOOGLE_ITEM = re.compile(r"^\s+(\*{0,2}\w+)\s*(?:\([^)]*\))?\s*:\s*(.+)$")
_SPHINX_ITEM = re.compile(r"^\s*:param\s+(?:[^:]*\s)?(\w+)\s*:\s*(.+)$")
_NUMPY_ITEM = re.compile(r"^(\w+)\s*:\s*[^\s].*$")


def param_docs(doc):
    """Parameter descriptions from a Google, Sphinx or NumPy style docstring: {name: first line}."""
    notes = {}
    lines = doc.splitlines()
    in_args = False
    numpy_args = False
    for i, line in enumerate(lines):
        m = _SPHINX_ITEM.match(line)
        if m:
            notes.setdefault(m.group(1), m.group(2).strip())
            continue
        if _GOOGLE_ARGS.match(line):
            in_args = True
            continue
        if line.strip() in ("Parameters", "Params") and i + 1 < len(lines) and set(lines[i + 1].strip()) == {"-"}:
            numpy_args = True
            continue
        if in_args:
            m = _GOOGLE_ITEM.match(line)
            if m:
                notes.setdefault(m.group(1).lstrip("*"), m.group(2).strip())
            elif line.strip() and not line.startswith((" ", "\t")):
                in_args = False
        elif numpy_args:
            m = _NUMPY_ITEM.match(line)
            if m and i + 1 < len(lines) and lines[i + 1].startswith((" ", "\t")):
                notes.setdefault(m.group(1), lines[i + 1].strip())
            elif line.strip() and set(line.strip()) == {"-"} and i > 0 and lines[i - 1].strip() != "Parameters":
                numpy_args = False
    return notes


def call_tool(name, arguments_json, limit, seconds):
    """Call a function with JSON arguments: {"status": ok|missing|bad_arguments|error|timeout, "text", "type"}."""
    fn, why = resolve(name)
    if fn is _MISSING:
        return json.dumps({"status": "missing", "text": why, "type": None})
    if not callable(fn):
        return json.dumps({"status": "error", "text": f"`{name}` is a {type_name(fn)}, not a function", "type": None})
    try:
        arguments = json.loads(arguments_json)
    except ValueError as exc:
        return json.dumps({"status": "bad_arguments", "text": f"the arguments are not valid JSON: {exc}", "type": None})
    if not isinstance(arguments, dict):
        text = f"the arguments must be a JSON object of parameter names, not {type(arguments).__name__}"
        return json.dumps({"status": "bad_arguments", "text": text, "type": None})
    args, kwargs = [], dict(arguments)
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        sig = None
    if sig is not None:
        for p in sig.parameters.values():
            if p.kind is p.POSITIONAL_ONLY and p.name in kwargs:
                args.append(kwargs.pop(p.name))
        try:
            sig.bind(*args, **kwargs)
        except TypeError as exc:
            text = f"bad arguments for {name}{sig}: {exc}"
            return json.dumps({"status": "bad_arguments", "text": text, "type": None})
    try:
        with time_limit(seconds):
            result = fn(*args, **kwargs)
    except TimeLimit:
        text = f"{name} ran past its {seconds:g} s time limit and was stopped"
        return json.dumps({"status": "timeout", "text": text, "type": None})
    except Exception as exc:
        frames = traceback.format_tb(exc.__traceback__)[1:][-ERROR_FRAMES:]  # [1:]: not our own frame
        text = clip(f"{name} raised {_error_text(exc)}\n" + "".join(frames), limit)
        return json.dumps({"status": "error", "text": text, "type": type(exc).__name__})
    kind = type_name(result)
    try:
        with time_limit(seconds):
            text = clip(result, limit) if isinstance(result, str) else describe(result, limit)
    except TimeLimit:
        text = f"{name} returned a {kind} whose repr took over {seconds:g} s, so it was stopped"
        return json.dumps({"status": "error", "text": text, "type": kind})
    except Exception as exc:
        text = f"{name} returned a {kind} whose repr raised {_error_text(exc)}"
        return json.dumps({"status": "error", "text": text, "type": kind})
    return json.dumps({"status": "ok", "text": text, "type": kind})
