"""How many CPU threads llama.cpp gets, and why (one sentence for the manifest)."""
from __future__ import annotations

import os


def choose_threads(n_threads: int | None = None, n_threads_batch: int | None = None,
                   cpus: int | None = None, load: float | None = None) -> tuple[int, int, str]:
    """(decode threads, prompt threads, reason).

    llama.cpp's threads wait for each other at every step by spinning, so when the machine is
    already busy (load >= cores) a second prompt thread makes prompts several times slower
    (measured here: 100 tokens took 8.4 s with 2 threads, 1.7 s with 1, at load 11 on 2 cores).
    """
    cpus = cpus or os.cpu_count() or 1
    if load is None:
        try:
            load = os.getloadavg()[0]
        except OSError:
            load = 0.0
    decode = n_threads or max(cpus // 2, 1)  # llama-cpp-python's own defaults
    if n_threads_batch:
        return decode, n_threads_batch, f"{decode} decode / {n_threads_batch} prompt threads, as asked"
    if load >= cpus and cpus > 1:
        return decode, decode, (f"{decode} decode / {decode} prompt threads: the machine is busy "
                                f"(load {load:.1f} on {cpus} cores)")
    return decode, cpus, f"{decode} decode / {cpus} prompt threads ({cpus} cores, load {load:.1f})"
