"""Live output from a real kernel to a Python consumer: how long a `print` takes to arrive, and how a flood
is coalesced into batches.

The delay is measured from `time.monotonic()` in the kernel, printed, to the batch holding that line reaching
on_batch (one clock: both processes read the same CLOCK_MONOTONIC). Prints are spaced by a random 50-150 ms so
each is its own event, not in phase with any flush timer.

Run from the checkout: .venv/bin/python bench/bench_kernel_live.py [--prints 50] [--burst 100000]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kernels import KernelPool, apply_events

TIMED_PRINTS = """\
import random, time
for _ in range({n}):
    time.sleep(random.uniform(0.05, 0.15))
    print(f"t={{time.monotonic():.6f}}")
"""


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(p / 100 * len(ordered)), len(ordered) - 1)]


async def print_delays(pool: KernelPool, n: int) -> list[float]:
    delays: list[float] = []

    def on_batch(events):
        now = time.monotonic()
        for event in events:
            for line in event.get("text", "").splitlines():
                if line.startswith("t="):
                    delays.append(now - float(line[2:]))

    res = await pool.execute("bench", TIMED_PRINTS.format(n=n), on_batch=on_batch, timeout=120)
    assert res.status == "ok" and len(delays) == n, (res.status, len(delays))
    return delays


async def burst(pool: KernelPool, lines: int) -> dict:
    batches: list[int] = []
    view: list[dict] = []

    def on_batch(events):
        batches.append(sum(len(e.get("text", "")) for e in events))
        apply_events(view, events)

    t0 = time.monotonic()
    res = await pool.execute("bench", f"for i in range({lines}):\n    print(i)\n", on_batch=on_batch, timeout=300)
    wall = time.monotonic() - t0
    assert res.status == "ok" and view == res.outputs
    return {"wall_s": wall, "batches": len(batches), "chars_sent": sum(batches), "largest_batch": max(batches),
            "stored_chars": len(res.stdout), "printed_chars": res.original_chars}


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prints", type=int, default=50, help="timed prints for the delay figures")
    ap.add_argument("--burst", type=int, default=100_000, help="lines in the burst")
    args = ap.parse_args()
    pool = KernelPool(spare=False)
    try:
        await pool.execute("bench", "1")  # start the kernel outside the timings
        delays = await print_delays(pool, args.prints)
        print(f"print -> on_batch delay over {len(delays)} prints: p50 {percentile(delays, 50) * 1000:.1f} ms, "
              f"p95 {percentile(delays, 95) * 1000:.1f} ms, max {max(delays) * 1000:.1f} ms, "
              f"mean {statistics.mean(delays) * 1000:.1f} ms (batch interval {pool.live_interval_s * 1000:.0f} ms)")
        b = await burst(pool, args.burst)
        print(f"burst of {args.burst:,} lines ({b['printed_chars']:,} characters) in {b['wall_s']:.2f} s: "
              f"{b['batches']} batches ({b['batches'] / b['wall_s']:.1f}/s), {b['chars_sent']:,} characters sent, "
              f"largest batch {b['largest_batch']:,}, stored {b['stored_chars']:,} (cap {pool.output_cap_chars:,})")
    finally:
        await pool.shutdown_all()


if __name__ == "__main__":
    asyncio.run(main())
