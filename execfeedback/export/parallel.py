"""The trace pass split over worker processes (the CLI uses one per core).

Worker i takes the traces whose id % n == i and writes each row with its trace id, split and
duplicate keys to a part file; the parent merges the parts back in trace order and runs the
duplicate check and the writers itself, so the files are exactly those one process would write.
`ex` is the exporter being run (exporter._Exporter), passed in: this module does not import it.
"""

from __future__ import annotations

import heapq
import multiprocessing
import os
import pickle
import shutil
import time
import traceback
from collections import Counter
from pathlib import Path

from .report import Stats, merge_stats
from .schema import FORMATS
from .source import Source


def _part(ex, where: str, params: list, i: int, n: int, directory: Path, progress, on_trace) -> None:
    """Rows of every n-th trace into <fmt>.part: trace id, split, exact key, near key, flags, JSON line."""
    directory.mkdir(parents=True, exist_ok=True)
    o = ex.o
    src = Source(ex.store.reader(), details="trajectory" in o.formats, request_sql=o.split_by == "dialog")
    files = {}

    def tick():
        progress[i] += 1
        on_trace()

    try:
        for tr, split in ex.traces(src, f"{where} AND t.id % ? = ?", [*params, n, i], on_trace=tick):
            tid = tr.row["id"]
            if tid in ex._edited:
                ex._seen_edited.add(tid)
            for spec in ex._specs(tr):
                done = ex.finish(spec)
                if done is None:
                    continue
                row, line, exact, cut_ = done
                f = files.get(spec.fmt)
                if f is None:
                    f = files[spec.fmt] = open(directory / f"{spec.fmt}.part", "w", encoding="utf-8",
                                               buffering=1 << 20)
                label = "" if spec.fmt != "kto" else ("1" if row["label"] else "0")
                f.write(f"{tid}\t{split}\t{exact.hex()}\t{spec.near.hex()}\t{int(cut_)}{label}\t{line}\n")
    finally:
        for f in files.values():
            f.close()
        src.close()


def _child(ex, where: str, params: list, i: int, n: int, directory: Path, progress) -> None:
    """A forked worker: its own connection, fresh counters; results pickled; no cleanup of the parent's state."""
    code = 0
    ex.stats = Stats()
    ex.scrubber.counts = Counter()
    ex.splitter.groups = {"train": set(), "test": set()}
    ex.splitter.tasks = {"train": set(), "test": set()}
    ex._seen_edited = set()
    try:
        _part(ex, where, params, i, n, directory, progress, lambda: None)
        result = {"stats": ex.stats, "secrets": ex.scrubber.counts, "groups": ex.splitter.groups,
                  "tasks": ex.splitter.tasks, "seen_edited": ex._seen_edited}
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises it
        result = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        code = 1
    try:
        with open(directory / "result.pickle", "wb") as f:
            pickle.dump(result, f)
    finally:
        os._exit(code)  # skip atexit and finalizers: the parent's SQLite handles must not be touched here


def _trace_id(line: str) -> int:
    return int(line[:line.index("\t")])


def parallel_trace_pass(ex, where: str, params: list, bar) -> None:
    n = ex.workers
    root = Path(ex.directory) / ".parts"
    ctx = multiprocessing.get_context("fork")
    progress = ctx.Array("q", n, lock=False)
    # Workers open their own snapshots: keep them to the traces the parent's snapshot holds.
    last = ex.source.count("SELECT coalesce(max(id), 0) FROM traces")
    where, params = f"{where} AND t.id <= ?", [*params, last]

    def show() -> None:
        done = sum(progress)
        if done > bar.n:
            bar.update(done - bar.n)

    procs = [ctx.Process(target=_child, args=(ex, where, params, i, n, root / str(i), progress), daemon=True)
             for i in range(1, n)]
    try:
        for p in procs:
            p.start()
        _part(ex, where, params, 0, n, root / "0", progress, show)
        while any(p.is_alive() for p in procs):
            show()
            time.sleep(0.05)
        show()
        for i, p in enumerate(procs, start=1):
            p.join()
            try:
                with open(root / str(i) / "result.pickle", "rb") as f:
                    result = pickle.load(f)
            except OSError:
                raise RuntimeError(f"export worker {i} died (exit code {p.exitcode}) without a result") from None
            if "error" in result:
                raise RuntimeError(f"export worker {i} failed: {result['error']}\n{result['traceback']}")
            merge_stats(ex.stats, result["stats"])
            ex.scrubber.counts.update(result["secrets"])
            for split, groups in result["groups"].items():
                ex.splitter.groups[split] |= groups
            for split, tasks in result["tasks"].items():
                ex.splitter.tasks[split] |= tasks
            ex._seen_edited |= result["seen_edited"]
        for fmt in FORMATS:
            parts = [open(root / str(i) / f"{fmt}.part", encoding="utf-8") for i in range(n)
                     if (root / str(i) / f"{fmt}.part").exists()]
            try:
                for line in heapq.merge(*parts, key=_trace_id):
                    _tid, split, exact, near, flags, text = line.rstrip("\n").split("\t", 5)
                    ex.accept(fmt, split, None, text, bytes.fromhex(exact), bytes.fromhex(near), cut_=flags[0] == "1",
                              label=(flags[1] == "1") if len(flags) > 1 else None)
            finally:
                for f in parts:
                    f.close()
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join()
        shutil.rmtree(root, ignore_errors=True)
