"""Loop overhead per round (everything but generation and execution) with the real loop and a real kernel.

Generation is a deterministic stand-in behind the real Engine: round 0 fails a visible check, round 1
raises a NameError, round 2 passes; every round is scored on hidden tests in a fresh namespace, as in
the eval. Two figures side by side, per round, against the 20 ms target:
- the loop's own `loop_overhead_s` (after the reply: extraction, feedback, the attempt record and its
  SQLite transaction; kernel time subtracted);
- end to end: a trace's wall time minus the stand-in's generation time minus the time spent inside
  KernelPool.execute, divided by its rounds (adds trace start/finish, the engine hop, message building).

Run from the checkout: .venv/bin/python bench/bench_loop.py [--problems 20]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dialog import Store
from execfeedback.loop.loop import Loop, LoopConfig, Task
from execfeedback.traces import TraceStore
from kernels import KernelPool
from local_model import Engine, Sampling
from local_model.protocol import Figures, done_event, token_event

TARGET_S = 0.020
REPLIES = [
    "Here it is:\n```python\ndef add(a, b):\n    return a - b\n```",
    "Fixed:\n```python\ndef add(a, b):\n    return a + c\n```",
    "Now:\n```python\ndef add(a, b):\n    return a + b\n```",
]
VISIBLE = "assert add(1, 2) == 3\nassert add(0, 0) == 0\n"
HIDDEN = "assert add(-1, 1) == 0\nassert add(10, 5) == 15\n"


class ScriptedBackend:
    """A stand-in model: the reply depends only on how many assistant turns came before."""

    supports_images = False
    n_ctx = 4096
    manifest = {"backend": "scripted", "model": "scripted-stand-in"}

    def __init__(self):
        self.generation_s = 0.0

    def count_tokens(self, messages_or_text) -> int:
        return 0

    def stream(self, messages, sampling=None, cache_key=None, should_stop=None):
        t0 = time.perf_counter()
        rnd = sum(1 for m in messages if m["role"] == "assistant")
        text = REPLIES[min(rnd, len(REPLIES) - 1)]
        words = text.split(" ")
        for w in words:
            yield token_event(w + " ")
        dt = time.perf_counter() - t0
        self.generation_s += dt
        yield done_event(text, "stop", Figures(ttft_s=dt, completion_tokens=len(words), decode_s=dt, total_s=dt))

    def close(self) -> None:
        pass


class TimedPool(KernelPool):
    """The real pool, with the time spent inside execute added up (that is execution, not overhead)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.exec_s = defaultdict(float)

    async def execute(self, key, code, *a, **kw):
        t0 = time.perf_counter()
        try:
            return await super().execute(key, code, *a, **kw)
        finally:
            self.exec_s[key] += time.perf_counter() - t0


def stats(values: list[float]) -> str:
    v = sorted(values)
    med, p95 = statistics.median(v), v[min(len(v) - 1, round(0.95 * (len(v) - 1)))]
    return f"median {1000 * med:6.2f} ms   p95 {1000 * p95:6.2f} ms   ({p95 / TARGET_S:4.2f}x of target at p95)"


async def main(n: int) -> None:
    with tempfile.TemporaryDirectory(prefix="lb-bench-loop-") as tmp:
        store = Store(tmp)
        traces = TraceStore(store)
        backend = ScriptedBackend()
        engine = Engine(backend)
        pool = TimedPool(spare=False, default_timeout=30,
                         resource_limits={"memory_bytes": 2 << 30, "cpu_seconds": 600})
        await pool.start()
        loop = Loop(engine, pool, traces, LoopConfig(rounds=3, exec_timeout=30, fresh_namespace=True,
                                                     sampling=Sampling(max_tokens=64)))
        own: dict[int, list[float]] = defaultdict(list)
        e2e: list[float] = []
        rounds_seen = []
        try:
            await pool.execute("bench", "1+1")  # start the kernel outside the timing
            for i in range(n + 2):
                task = Task(kind="eval", messages=[{"role": "user", "content": "Write add(a, b)."}],
                            kernel_key="bench", checks=VISIBLE, hidden_tests=HIDDEN, task_id=f"p{i}")
                records = []
                gen0, exec0 = backend.generation_s, pool.exec_s["bench"]
                t0 = time.perf_counter()
                res = await loop.run_to_end(task, on_event=lambda ev: ev["type"] == "attempt" and records.append(ev["attempt"]))
                wall = time.perf_counter() - t0
                assert res.status == "passed", res.stop_reason
                if i < 2:
                    continue  # warm-up: imports, first SQLite pages
                rounds = len(records)
                rounds_seen.append(rounds)
                for r in records:
                    own[r["round"]].append(r["loop_overhead_s"])
                gen, exe = backend.generation_s - gen0, pool.exec_s["bench"] - exec0
                e2e.append((wall - gen - exe) / rounds)
        finally:
            await pool.shutdown_all()
            engine.close()
            store.close()
    print(f"Loop overhead per round, {n} problems x {statistics.mean(rounds_seen):.0f} rounds "
          f"(real loop, real kernel, stand-in generation); target < {1000 * TARGET_S:.0f} ms")
    for rnd, values in sorted(own.items()):
        print(f"  loop_overhead_s, round {rnd}:  {stats(values)}")
    print(f"  loop_overhead_s, all rounds: {stats([v for vs in own.values() for v in vs])}")
    print(f"  end to end per round:       {stats(e2e)}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problems", type=int, default=20)
    asyncio.run(main(ap.parse_args().problems))
