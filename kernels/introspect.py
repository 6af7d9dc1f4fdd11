"""Completion and help from a dialog's kernel: Jupyter's complete_request and inspect_request.

A Jupyter kernel answers shell requests one at a time, in order: while a cell runs, a completion
would wait behind it. So a request is sent only to an idle kernel; while a cell runs the answer is
status "busy" at once, and a kernel that does not answer within the timeout gives "timeout" (its late
reply is dropped). Cursor positions count Unicode code points (Python str indices), as in Jupyter's
protocol 5.2+; a browser counts UTF-16 units, so astral characters need converting.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .result import exit_description

if TYPE_CHECKING:
    from .kernel import Kernel

TIMEOUT_S = 2.0
STATUSES = ("ok", "busy", "timeout", "dead", "none", "error")

_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[@-Z\\-_]")
# IPython's inspector writes "Title: value" sections; a long value starts on the next line.
_SECTIONS = (
    "Signature", "Init signature", "Call signature", "Docstring", "Init docstring", "Class docstring",
    "Call docstring", "Type", "String form", "Length", "File", "Source", "Subclasses", "Namespace",
)
_SECTION = re.compile(r"^(" + "|".join(_SECTIONS) + r"):[ \t]*(.*)$")


@dataclass
class Completion:
    """Matches replacing code[cursor_start:cursor_end]; `items` add each match's type when the kernel says."""

    status: str
    matches: list[str] = field(default_factory=list)
    cursor_start: int = 0
    cursor_end: int = 0
    items: list[dict[str, Any]] = field(default_factory=list)  # {"text", "type", "start", "end", "signature"}
    message: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Inspection:
    """Help for the name at the cursor: IPython's inspector text, ANSI-free, and its main sections."""

    status: str
    found: bool = False
    text: str = ""
    signature: str | None = None
    docstring: str | None = None
    sections: dict[str, str] = field(default_factory=dict)
    message: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)


async def complete(
    kernel: Kernel | None, state: str, code: str, cursor_pos: int | None = None, timeout: float = TIMEOUT_S
) -> Completion:
    """Ask the kernel for completions at cursor_pos (default: the end of code)."""
    pos = _check(code, cursor_pos, timeout)
    content = {"code": code, "cursor_pos": pos}
    status, reply, message = await _ask(kernel, state, "complete_request", content, timeout)
    if reply is None:
        return Completion(status, cursor_start=pos, cursor_end=pos, message=message)
    matches = [str(m) for m in reply.get("matches") or []]
    start, end = reply.get("cursor_start", pos), reply.get("cursor_end", pos)
    typed = (reply.get("metadata") or {}).get("_jupyter_types_experimental")
    if isinstance(typed, list) and typed:
        items = [
            {"text": str(t.get("text", "")), "type": t.get("type") or None, "start": t.get("start", start),
             "end": t.get("end", end), "signature": t.get("signature") or None}
            for t in typed if isinstance(t, dict)
        ]
    else:
        items = [{"text": m, "type": None, "start": start, "end": end, "signature": None} for m in matches]
    return Completion("ok", matches, start, end, items)


async def inspect(
    kernel: Kernel | None,
    state: str,
    code: str,
    cursor_pos: int | None = None,
    detail_level: int = 0,
    timeout: float = TIMEOUT_S,
) -> Inspection:
    """Ask the kernel for help on the name at cursor_pos; detail_level 1 adds the source where it can."""
    pos = _check(code, cursor_pos, timeout)
    if detail_level not in (0, 1):
        raise ValueError(f"detail_level must be 0 or 1, got {detail_level!r}")
    content = {"code": code, "cursor_pos": pos, "detail_level": detail_level}
    status, reply, message = await _ask(kernel, state, "inspect_request", content, timeout)
    if reply is None:
        return Inspection(status, message=message)
    if not reply.get("found"):
        return Inspection("ok", message="The kernel has no help for the name at the cursor.")
    data = reply.get("data") or {}
    text = strip_ansi(str(data.get("text/plain") or data.get("text/markdown") or ""))
    sections = parse_sections(text)
    signature = next((sections[k] for k in ("Signature", "Init signature", "Call signature") if k in sections), None)
    docstring = next((sections[k] for k in ("Docstring", "Class docstring", "Init docstring") if k in sections), None)
    return Inspection("ok", True, text, signature, docstring, sections)


def parse_sections(text: str) -> dict[str, str]:
    """IPython inspector text as {"Signature": ..., "Docstring": ..., "Type": ...}."""
    sections: dict[str, str] = {}
    title: str | None = None
    lines: list[str] = []
    for line in text.splitlines():
        m = _SECTION.match(line)
        if m:
            if title is not None:
                sections[title] = "\n".join(lines).strip()
            title, lines = m.group(1), [m.group(2)]
        elif title is not None:
            lines.append(line)
    if title is not None:
        sections[title] = "\n".join(lines).strip()
    return sections


def _check(code: Any, cursor_pos: Any, timeout: Any) -> int:
    if not isinstance(code, str):
        raise TypeError(f"code must be a str, got {type(code).__name__}")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    if cursor_pos is None:
        return len(code)
    if isinstance(cursor_pos, bool) or not isinstance(cursor_pos, int) or not 0 <= cursor_pos <= len(code):
        raise ValueError(f"cursor_pos must be an int from 0 to len(code) = {len(code)}, got {cursor_pos!r}")
    return cursor_pos


async def _ask(
    kernel: Kernel | None, state: str, msg_type: str, content: dict[str, Any], timeout: float
) -> tuple[str, dict[str, Any] | None, str | None]:
    """(status, reply content or None, message) for one request to the kernel."""
    if state in ("starting", "restarting"):
        return "busy", None, "The kernel is starting; ask again in a moment."
    if kernel is None:
        return "none", None, "This dialog has no kernel yet: run a cell to start one."
    if not kernel.alive():
        return "dead", None, _dead(kernel)
    if kernel.executing:
        return "busy", None, (
            "The kernel is running a cell; a Jupyter kernel answers one request at a time, so completion "
            "and help come back when the cell finishes."
        )
    reply = await kernel.request(msg_type, content, timeout)
    if reply is None:
        if not kernel.alive():
            return "dead", None, _dead(kernel)
        return "timeout", None, (
            f"The kernel did not answer within {timeout:g} s; it may have started running a cell. Try again."
        )
    if reply.get("status") != "ok":
        detail = f"{reply.get('ename', 'error')}: {reply.get('evalue', '')}".strip()
        return "error", None, f"The kernel could not answer ({detail})."
    return "ok", reply, None


def _dead(kernel: Kernel) -> str:
    return f"The kernel has died ({exit_description(kernel.poll())}); it restarts on the next run."
