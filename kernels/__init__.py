"""One Jupyter kernel per dialog: start, run with a timeout, interrupt, restart, capture outputs."""

from .kernel import KernelStartError
from .pool import KernelInitError, KernelPool
from .result import ExecResult

__all__ = ["ExecResult", "KernelInitError", "KernelPool", "KernelStartError"]
