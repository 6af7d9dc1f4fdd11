"""Values and functions of a dialog's kernel for prompts: `$`name`` summaries and `&`fn`` tools.

Each request is one silent execution (no history, no execution count, no `_` or `Out`) through the
pool, so it waits for a cell already running in that kernel and reads the values that cell left. The
work happens in the kernel module `_loopbook_probe` (namespace_inkernel.py, sent as source once per
kernel) and the answer comes back as a user expression, so the user's namespace gets no new names.
Each item has its own time limit inside the kernel (SIGALRM); the execution's own timeout, a few
seconds longer, interrupts what ignores that.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import keyword
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .capture import clip_text
from .result import ExecResult

if TYPE_CHECKING:
    from .pool import KernelPool

MODULE = "_loopbook_probe"
SOURCE = Path(__file__).with_name("namespace_inkernel.py").read_text(encoding="utf-8")
VERSION = hashlib.sha256(SOURCE.encode()).hexdigest()[:16]
# One `if` statement: it binds no name in the user's namespace.
INSTALL = (
    f"if getattr(__import__('sys').modules.get({MODULE!r}), 'VERSION', None) != {VERSION!r}:\n"
    f"    exec(compile({SOURCE + f'{chr(10)}VERSION = {VERSION!r}{chr(10)}'!r}, '<loopbook-probe>', 'exec'), "
    f"__import__('sys').modules.setdefault({MODULE!r}, __import__('types').ModuleType({MODULE!r})).__dict__)\n"
)
SLACK_S = 5.0  # the execution's timeout beyond the items' own limits
STDOUT_CHARS = 2_000


@dataclass
class VariableNote:
    """One `$`name``: status "ok", "missing", "error", "timeout" or "invalid"; `text` is what a prompt shows."""

    name: str
    status: str
    type: str | None
    text: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class ToolSpec:
    """One `&`fn``: `spec` is {"name", "description", "parameters": JSON schema} when status is "ok"."""

    name: str
    status: str
    spec: dict[str, Any] | None
    text: str | None = None  # why there is no spec

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class ToolResult:
    """One tool call: status "ok", "missing", "bad_arguments", "error", "timeout" or "failed"; text for the model."""

    name: str
    status: str
    text: str
    type: str | None = None  # the result's type, or the exception's name
    stdout: str = ""  # what the tool printed (stdout and stderr), trimmed
    duration_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


async def variables(
    pool: KernelPool, key: str, names: list[str], *, timeout_per_name: float = 2.0, max_chars: int = 2_000
) -> list[VariableNote]:
    """A trimmed, helpful text for each name (or dotted attribute path) in the key's kernel."""
    _check_limits(timeout_per_name, max_chars)
    notes: dict[int, VariableNote] = {}
    valid: list[str] = []
    for i, name in enumerate(_check_names(names)):
        why = name_problem(name)
        if why:
            notes[i] = VariableNote(str(name)[:200], "invalid", None, why)
        else:
            valid.append(name)
    if valid:
        call = f"__import__({MODULE!r}).variables({json.dumps(valid)!r}, {max_chars}, {timeout_per_name!r})"
        probe = await _probe(pool, key, call, timeout_per_name * len(valid) + SLACK_S)
        found = iter(probe.answer or [])
        for i, name in enumerate(names):
            if i in notes:
                continue
            item = next(found, None)
            if item is None:
                notes[i] = VariableNote(name, probe.status, None, probe.message or "the kernel gave no answer")
            else:
                notes[i] = VariableNote(name, item["status"], item.get("type"), item["text"])
    return [notes[i] for i in range(len(names))]


async def tool_specs(pool: KernelPool, key: str, names: list[str], *, max_chars: int = 2_000) -> list[ToolSpec]:
    """A JSON-schema tool description for each function name, from its signature and docstring."""
    _check_limits(1.0, max_chars)
    specs: dict[int, ToolSpec] = {}
    valid: list[str] = []
    for i, name in enumerate(_check_names(names)):
        why = name_problem(name)
        if why:
            specs[i] = ToolSpec(str(name)[:200], "invalid", None, why)
        else:
            valid.append(name)
    if valid:
        call = f"__import__({MODULE!r}).tool_specs({json.dumps(valid)!r}, {max_chars})"
        probe = await _probe(pool, key, call, 10.0 + SLACK_S)
        found = iter(probe.answer or [])
        for i, name in enumerate(names):
            if i not in specs:
                item = next(found, None)
                specs[i] = (ToolSpec(name, item["status"], item.get("spec"), item.get("text")) if item
                            else ToolSpec(name, probe.status, None, probe.message or "the kernel gave no answer"))
    return [specs[i] for i in range(len(names))]


async def call_tool(
    pool: KernelPool,
    key: str,
    name: str,
    arguments: dict[str, Any] | str,
    *,
    timeout: float = 30.0,
    max_chars: int = 4_000,
) -> ToolResult:
    """Call a kernel function with JSON arguments (a dict or JSON text); its trimmed result or error text."""
    _check_limits(timeout, max_chars)
    why = name_problem(name)
    if why:
        return ToolResult(str(name)[:200], "invalid", why)
    if isinstance(arguments, str):
        text = arguments
    else:
        try:
            text = json.dumps(arguments)
        except (TypeError, ValueError) as exc:
            return ToolResult(name, "bad_arguments", f"the arguments are not JSON: {exc}")
    call = f"__import__({MODULE!r}).call_tool({name!r}, {text!r}, {max_chars}, {timeout!r})"
    probe = await _probe(pool, key, call, timeout + SLACK_S)
    res = probe.result
    printed = clip_text(res.stdout + res.stderr, STDOUT_CHARS)
    duration = round(res.duration_s, 4)
    if probe.answer is None:
        return ToolResult(name, probe.status, probe.message or "no answer", None, printed, duration)
    answer = probe.answer
    return ToolResult(name, answer["status"], answer["text"], answer.get("type"), printed, duration)


def name_problem(name: Any) -> str | None:
    """Why `name` is not a name or dotted attribute path (None when it is one)."""
    if not isinstance(name, str) or not name:
        return f"{name!r} is not a name"
    if len(name) > 200:
        return "the name is over 200 characters long"
    parts = name.split(".")
    if not all(p.isidentifier() and not keyword.iskeyword(p) for p in parts):
        return f"`{name}` is not a Python name or dotted attribute path (like `df` or `model.config`)"
    return None


@dataclass
class _Probe:
    result: ExecResult
    answer: Any = None  # the decoded JSON answer; None when there is none
    status: str = "ok"  # else "timeout" or "error": why there is no answer
    message: str | None = None


async def _probe(pool: KernelPool, key: str, call: str, timeout: float) -> _Probe:
    """Run `call`, an expression that returns JSON text, in the key's kernel, after installing the helper."""
    res = await pool.execute(key, INSTALL, timeout=timeout, silent=True, store_history=False,
                             user_expressions={"out": call})
    out = (res.user_expressions or {}).get("out") or {}
    if res.status == "timeout" or out.get("ename") == "KeyboardInterrupt":
        message = f"the request ran past its {timeout:g} s time limit and was interrupted"
        if pool.state(key) == "dead":
            message += "; it did not stop, so the kernel was stopped (it restarts on the next run)"
        return _Probe(res, status="timeout", message=message)
    if res.status != "ok":
        return _Probe(res, status="error", message=res.message or _error(res.error) or f"status {res.status}")
    if out.get("status") != "ok":
        return _Probe(res, status="error", message=f"the kernel could not answer: {_error(out) or 'no answer'}")
    try:
        return _Probe(res, json.loads(ast.literal_eval((out.get("data") or {}).get("text/plain", ""))))
    except (ValueError, SyntaxError, TypeError) as exc:
        return _Probe(res, status="error", message=f"the kernel's answer could not be read ({exc})")


def _error(content: dict[str, Any] | None) -> str | None:
    if not content or not content.get("ename"):
        return None
    return f"{content.get('ename')}: {content.get('evalue', '')}"


def _check_names(names: Any) -> list[Any]:
    if isinstance(names, str) or not isinstance(names, (list, tuple)):
        raise TypeError(f"names must be a list of names, got {type(names).__name__}")
    return list(names)


def _check_limits(seconds: Any, chars: Any) -> None:
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds > 0:
        raise ValueError(f"time limits must be a positive number of seconds, got {seconds!r}")
    if isinstance(chars, bool) or not isinstance(chars, int) or chars < 100:
        raise ValueError(f"max_chars must be an int of at least 100, got {chars!r}")
