"""One Jupyter kernel per dialog: start, run with a timeout, interrupt, restart, capture outputs."""

from .capture import fold
from .introspect import Completion, Inspection
from .kernel import KernelStartError
from .live import LiveOutputs, apply_events, diff_outputs
from .namespace import ToolResult, ToolSpec, VariableNote
from .pool import KernelInitError, KernelPool
from .result import ExecResult

__all__ = [
    "Completion",
    "ExecResult",
    "Inspection",
    "KernelInitError",
    "KernelPool",
    "KernelStartError",
    "LiveOutputs",
    "ToolResult",
    "ToolSpec",
    "VariableNote",
    "apply_events",
    "diff_outputs",
    "fold",
]
