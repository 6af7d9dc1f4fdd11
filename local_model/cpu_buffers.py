"""Whether llama.cpp may repack a model's weights into the CPU's extra buffer types (AMX and the like)."""

from __future__ import annotations

import os
from functools import lru_cache

ENV = "LOOPBOOK_CPU_EXTRA_BUFFERS"


@lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            line = next((ln for ln in f if ln.startswith("flags")), "")
    except OSError:
        return frozenset()
    return frozenset(line.partition(":")[2].split())


def extra_buffers(wanted: bool | None = None) -> tuple[bool, str]:
    """(allowed, why). Off where the CPU advertises AMX, unless asked for.

    Virtual machines can advertise AMX without granting its tile state: ggml's AMX buffer type then dies
    at `ldtilecfg` with a general protection fault (seen here on a Xeon VM, intermittently for the base
    model and at once with a LoRA adapter). Plain CPU buffers are always safe.
    """
    if wanted is None:
        given = os.environ.get(ENV, "").strip().lower()
        wanted = {"1": True, "on": True, "true": True, "0": False, "off": False, "false": False}.get(given)
        if given and wanted is None:
            raise ValueError(f"{ENV}={given!r}: use 1 or 0")
    if wanted is not None:
        return wanted, f"CPU extra buffer types {'on' if wanted else 'off'}, as asked"
    if "amx_tile" in _cpu_flags():
        return False, f"CPU extra buffer types off: the CPU advertises AMX (set {ENV}=1 on bare metal)"
    return True, "CPU extra buffer types on"
