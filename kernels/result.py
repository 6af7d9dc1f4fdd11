"""The outcome of running one cell, and the sentences that explain the unhappy ones."""

from __future__ import annotations

import dataclasses
import signal
from dataclasses import dataclass, field
from typing import Any

STATUSES = ("ok", "error", "timeout", "died", "interrupted")

# Why a signal usually ends a kernel, said in the user's terms.
_SIGNAL_HINTS = {
    "SIGKILL": "a SIGKILL usually means the machine, or the kernel's memory limit, ran out of memory",
    "SIGXCPU": "the kernel used up its CPU-time limit",
    "SIGSEGV": "native code crashed (a segmentation fault)",
    "SIGBUS": "native code crashed (a bus error)",
    "SIGABRT": "native code aborted the process",
}


@dataclass
class ExecResult:
    """What one execution produced: status, nbformat v4 outputs and how they were capped."""

    status: str
    outputs: list[dict[str, Any]] = field(default_factory=list)
    execution_count: int | None = None
    duration_s: float = 0.0
    error: dict[str, Any] | None = None
    truncated: bool = False
    original_chars: int = 0
    message: str | None = None
    user_expressions: dict[str, Any] | None = None  # from the execute_reply, when any were asked for

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def stdout(self) -> str:
        return _stream_text(self.outputs, "stdout")

    @property
    def stderr(self) -> str:
        return _stream_text(self.outputs, "stderr")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _stream_text(outputs: list[dict[str, Any]], name: str) -> str:
    return "".join(o["text"] for o in outputs if o.get("output_type") == "stream" and o.get("name") == name)


def signal_name(returncode: int | None) -> str | None:
    """'SIGSEGV' for a Popen return code of -11; None for a plain exit."""
    if returncode is None or returncode >= 0:
        return None
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


def exit_description(returncode: int | None) -> str:
    if returncode is None:
        return "exit code unknown"
    name = signal_name(returncode)
    return f"exit code {returncode}, {name}" if name else f"exit code {returncode}"


def died_message(returncode: int | None) -> str:
    hint = _SIGNAL_HINTS.get(signal_name(returncode) or "")
    text = f"The kernel died while running this cell ({exit_description(returncode)})."
    if hint:
        text += f" Likely cause: {hint}."
    return text + " It will restart on the next run; the dialog is unchanged."


def format_seconds(seconds: float) -> str:
    return f"{seconds:g} s"


def timeout_message(timeout: float, *, kernel_stopped: bool) -> str:
    if kernel_stopped:
        return (
            f"The cell ran past its {format_seconds(timeout)} time limit and did not stop when interrupted, "
            "so its kernel was stopped. It will restart on the next run; earlier variables are lost, "
            "the dialog is unchanged."
        )
    return (
        f"The cell ran past its {format_seconds(timeout)} time limit and was interrupted; "
        "the kernel kept its variables."
    )


INTERRUPTED_MESSAGE = "The cell was interrupted; the kernel kept its variables."
ABORTED_MESSAGE = "The kernel skipped this cell because an earlier request failed; run it again."
RESTARTED_MESSAGE = "The kernel was restarted while this cell was running; its variables are gone."
SHUTDOWN_MESSAGE = "The kernel was shut down while this cell was running."
