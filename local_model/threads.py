"""How many CPU threads llama.cpp gets, and why (one sentence for the manifest)."""
from __future__ import annotations

import os
from pathlib import Path

ENV_DECODE, ENV_PROMPT = "LOOPBOOK_THREADS", "LOOPBOOK_THREADS_BATCH"
SYSFS = Path("/sys/devices/system/cpu")


def physical_cores(cpus: set[int] | None = None, sysfs: Path = SYSFS) -> int:
    """Cores this process may run on, one per set of hyperthread siblings, as llama.cpp's own tools count.

    One thread per physical core is what llama.cpp's CLI and server default to: a second thread on a
    core's sibling only waits for the first, and on a 2-vCPU VM `cpu_count() // 2` halves decode speed
    (measured here with the coder model: 7.4-7.7 tok/s with 1 thread, 13.0-13.6 with 2).
    """
    cpus = cpus if cpus is not None else (os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity")
                                           else set(range(os.cpu_count() or 1)))
    cores = set()
    for cpu in cpus:
        try:
            cores.add((sysfs / f"cpu{cpu}" / "topology" / "thread_siblings_list").read_text().strip())
        except OSError:
            return max(len(cpus), 1)  # no topology to read: count each CPU as a core
    return max(len(cores), 1)


def _from_env(name: str) -> int | None:
    text = os.environ.get(name, "").strip()
    if not text:
        return None
    if not text.isdecimal() or int(text) < 1:
        raise ValueError(f"{name}={text!r}: give a whole number of threads, 1 or more")
    return int(text)


def choose_threads(n_threads: int | None = None, n_threads_batch: int | None = None,
                   cores: int | None = None) -> tuple[int, int, str]:
    """(decode threads, prompt threads, reason): at most one per physical core unless asked otherwise.

    Nothing is frozen from the load average at start-up: a reading then says nothing of the hours a
    model stays loaded (an eval started just after another job ran all 42 minutes of it at 1 thread).
    Unless asked, each generation takes what is free at that moment (threads_now).
    """
    cores = cores or physical_cores()
    asked_decode = n_threads or _from_env(ENV_DECODE)
    asked_prompt = n_threads_batch or _from_env(ENV_PROMPT)
    decode, prompt = asked_decode or cores, asked_prompt or cores
    how = "as asked" if asked_decode or asked_prompt else "one per physical core, fewer while other work runs"
    return decode, prompt, f"{decode} decode / {prompt} prompt threads ({how}; {cores} physical cores)"


def adaptive(n_threads: int | None = None, n_threads_batch: int | None = None) -> bool:
    """Whether thread counts follow the machine's load per generation (nobody fixed them)."""
    return not (n_threads or n_threads_batch or _from_env(ENV_DECODE) or _from_env(ENV_PROMPT))


def own_running(tasks: Path = Path("/proc/self/task")) -> int:
    """This process's threads that are running or ready now (state R), the asking one included."""
    n = 0
    try:
        entries = list(tasks.iterdir())
    except OSError:
        return 1
    for t in entries:
        try:
            text = (t / "stat").read_text()
            n += text[text.rindex(")") + 2] == "R"
        except (OSError, ValueError, IndexError):
            continue
    return max(n, 1)


def runnable_elsewhere(stat: Path = Path("/proc/stat"), samples: int = 3,
                       tasks: Path = Path("/proc/self/task")) -> int:
    """Threads ready to run on this machine right now outside this process (the least of a few readings).

    This process's own threads do not count: the event loop or a kernel client thread that happens to run
    as a generation starts is not competition for llama.cpp's threads (counting them, an idle machine
    decoded every other eval problem at 1 thread: 6.5 instead of 11.8 tokens/s)."""
    seen = []
    for _ in range(samples):
        try:
            line = next(ln for ln in stat.read_text().splitlines() if ln.startswith("procs_running"))
            seen.append(int(line.split()[1]) - own_running(tasks))
        except (OSError, StopIteration, ValueError, IndexError):
            return 0
    return max(min(seen), 0)


def threads_now(most: int, busy: int | None = None) -> int:
    """Threads for the generation about to start: `most`, less one per thread already running elsewhere.

    llama.cpp's threads meet at a spinning barrier after every step, so one that has to share its core
    stalls all the others: measured here on 2 cores with a test suite running beside it, Solve took
    over 70 s with 2 threads and 23 s with 1.
    """
    busy = runnable_elsewhere() if busy is None else busy
    return max(1, min(most, most - busy))
