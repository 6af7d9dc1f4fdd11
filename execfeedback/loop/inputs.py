"""Test inputs the model writes for selection by execution: one short greedy generation asks for calls of the task's
function; only the calls (the inputs) are kept, never a result the model predicts for them (CodeT, MBR-exec)."""

from __future__ import annotations

import ast

from .extract import extract_code
from .select import check_calls

MAX_TOKENS = 200


def defined_functions(code: str | None) -> list[str]:
    """The top-level functions `code` defines, in order."""
    try:
        tree = ast.parse(code or "")
    except SyntaxError:
        return []
    return [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def signature(code: str, name: str) -> str:
    """`def name(args):` as written in `code` (its first line), for the prompt."""
    for line in code.splitlines():
        if line.lstrip().startswith(("def " + name, "async def " + name)):
            return line.strip()
    return f"def {name}(...):"


def task_text(messages: list[dict]) -> str:
    """The task as the model was asked it: the last user turn of the round-0 input."""
    for m in reversed(messages):
        if m.get("role") == "user" and isinstance(m.get("content"), str):
            return m["content"]
    return ""


def inputs_prompt(messages: list[dict], code: str, name: str, n: int) -> list[dict]:
    """One user turn: the task, the function's signature, and a request for `n` calls with no results."""
    return [{"role": "user", "content": (
        f"{task_text(messages)}\n\nThe function is `{signature(code, name)}`. Do not write it. Write {n} different "
        f"calls of `{name}` that would test it well (typical cases and edge cases), one per line, each a plain call "
        f"with literal arguments, like `{name}(...)`. Write only the calls in one ```python block: no results, no "
        "asserts, no explanation.")}]


def parse_inputs(reply: str, names: list[str], limit: int) -> list[tuple[str, list, dict]]:
    """The calls of `names` with literal arguments in the reply, line by line (a line that does not parse is
    skipped); from `assert f(1) == 2` only `f(1)` is taken: the predicted output is never used."""
    ex = extract_code(reply)
    text = ex.code if ex.ok and ex.code else reply
    out, seen = [], set()
    for line in text.splitlines():
        for call in check_calls(line.strip()):
            key = repr(call)
            if call[0] in names and key not in seen:
                seen.add(key)
                out.append(call)
    return out[:limit]
