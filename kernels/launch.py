"""How a kernel process is started: its command line, resource limits and private runtime folder."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any

# Kernels keep IPython's history in memory: many kernels writing one history.sqlite in the user's
# home slows their start and can lock; a dialog keeps its own history anyway.
KERNEL_ARGS = ["--HistoryManager.hist_file=:memory:"]

# Runs in the kernel's own process before ipykernel starts, so the limits hold for the kernel and
# every process it spawns. A -c wrapper (rather than Popen's preexec_fn) works with jupyter_client's
# provisioner unchanged and is safe in a threaded parent. It also sets how long ipykernel holds what a
# cell prints before sending it (0.2 s by default, the main delay of live output).
LAUNCH_WRAPPER = """\
import resource, runpy, sys
def _limit(which, soft, spare=0):
    _, hard = resource.getrlimit(which)
    cap = hard if hard != resource.RLIM_INFINITY else None
    soft = soft if cap is None else min(soft, cap)
    new_hard = soft + spare if cap is None else min(soft + spare, cap)
    resource.setrlimit(which, (soft, new_hard))
mem, cpu, flush = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
if mem > 0:
    _limit(resource.RLIMIT_AS, mem)
if cpu > 0:
    _limit(resource.RLIMIT_CPU, cpu, spare=5)  # SIGXCPU at the soft limit says why; SIGKILL 5 s later
if flush > 0:
    import ipykernel.iostream
    ipykernel.iostream.OutStream.flush_interval = flush
sys.argv = [sys.argv[0]] + sys.argv[4:]
runpy.run_module("ipykernel_launcher", run_name="__main__", alter_sys=True)
"""

_LIMIT_KEYS = {"memory_bytes", "cpu_seconds"}


def check_resource_limits(limits: dict[str, Any] | None) -> dict[str, int] | None:
    """Validate {"memory_bytes": int, "cpu_seconds": int}; raise a ValueError that says how to fix it."""
    if not limits:
        return None
    if not isinstance(limits, dict):
        raise ValueError(
            f"resource_limits must be a dict like {{'memory_bytes': 2**30, 'cpu_seconds': 60}}, got {limits!r}"
        )
    unknown = set(limits) - _LIMIT_KEYS
    if unknown:
        raise ValueError(
            f"resource_limits has unknown keys {sorted(unknown)}; use only {sorted(_LIMIT_KEYS)}"
        )
    clean: dict[str, int] = {}
    for key, value in limits.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"resource_limits[{key!r}] must be a positive int (or None for no limit), got {value!r}")
        clean[key] = value
    return clean or None


def kernel_argv(python: str, limits: dict[str, int] | None = None, flush_s: float | None = None) -> list[str]:
    """The kernel command line; `{connection_file}` is filled in by jupyter_client.

    flush_s: how often the kernel sends printed text (None: ipykernel's own 0.2 s).
    """
    tail = ["-f", "{connection_file}", *KERNEL_ARGS]
    if not limits and not flush_s:
        return [python, "-m", "ipykernel_launcher", *tail]
    mem, cpu = (limits or {}).get("memory_bytes", 0), (limits or {}).get("cpu_seconds", 0)
    return [python, "-c", LAUNCH_WRAPPER, str(mem), str(cpu), repr(float(flush_s or 0)), *tail]


RUNTIME_PREFIX = "loopbook-kernels-"
OWNER_FILE = "owner.pid"


def sweep_stale_runtime_dirs() -> None:
    """Remove default runtime folders whose app died without cleaning up (SIGKILL, power loss).

    Their kernels are gone too: ipykernel exits when its parent process does.
    """
    for folder in Path(tempfile.gettempdir()).glob(RUNTIME_PREFIX + "*"):
        try:
            if folder.stat().st_uid != os.getuid():
                continue
            pid = int((folder / OWNER_FILE).read_text().strip())
        except (OSError, ValueError):
            continue
        if pid == os.getpid() or _pid_exists(pid):
            continue
        shutil.rmtree(folder, ignore_errors=True)


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def make_runtime_dir(path: str | os.PathLike | None = None) -> tuple[Path, bool]:
    """A private (0700) folder for connection files and IPC sockets; returns it and whether we made it.

    IPC socket paths must stay under about 100 bytes, so the default lives in the system temp folder.
    """
    if path is None:
        sweep_stale_runtime_dirs()
        runtime = Path(tempfile.mkdtemp(prefix=RUNTIME_PREFIX))
        (runtime / OWNER_FILE).write_text(str(os.getpid()))
        return runtime, True
    runtime = Path(path).expanduser().resolve()
    created = not runtime.exists()
    runtime.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not runtime.is_dir():
        raise ValueError(f"runtime_dir {str(runtime)!r} is not a folder; pass a folder path or None")
    if stat.S_IMODE(runtime.stat().st_mode) != 0o700:
        os.chmod(runtime, 0o700)
    if len(str(runtime)) > 60:
        raise ValueError(
            f"runtime_dir {str(runtime)!r} is too long for IPC socket paths (at most 60 characters); "
            "pass a shorter folder or None for a private temp folder"
        )
    return runtime, created
