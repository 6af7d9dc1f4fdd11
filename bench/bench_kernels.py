"""Kernel latencies side by side: raw jupyter_client vs KernelPool, first runs with and without the spare, and
how soon a dying kernel is reported.

Run from the checkout: .venv/bin/python bench/bench_kernels.py [--n 200] [--first 3] [--deaths 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jupyter_client import AsyncKernelManager

from kernels import KernelPool


async def raw_round_trips(n: int) -> list[float]:
    """`1+1` through a bare AsyncKernelClient: send, read iopub to idle, read the reply."""
    with tempfile.TemporaryDirectory(prefix="lb-bench-") as tmp:
        km = AsyncKernelManager(transport="ipc", connection_file=f"{tmp}/k.json")
        await km.start_kernel()
        kc = km.client()
        kc.start_channels()
        await kc.wait_for_ready(timeout=60)
        times = []
        try:
            for _ in range(n + 5):
                t0 = time.perf_counter()
                msg_id = kc.execute("1+1")
                while True:
                    msg = await kc.get_iopub_msg(timeout=30)
                    if msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "status" \
                            and msg["content"]["execution_state"] == "idle":
                        break
                while (await kc.get_shell_msg(timeout=30))["parent_header"].get("msg_id") != msg_id:
                    pass
                times.append(time.perf_counter() - t0)
        finally:
            kc.stop_channels()
            await km.shutdown_kernel(now=True)
        return times[5:]  # the first runs warm the kernel up


async def pool_round_trips(n: int) -> list[float]:
    pool = KernelPool(spare=False)
    try:
        times = []
        for _ in range(n + 5):
            t0 = time.perf_counter()
            res = await pool.execute("bench", "1+1")
            times.append(time.perf_counter() - t0)
            assert res.status == "ok", res
        return times[5:]
    finally:
        await pool.shutdown_all()


async def first_runs(spare: bool, runs: int) -> list[float]:
    """Time from a new key's first execute call to its result (the kernel start included)."""
    pool = KernelPool(spare=spare)
    try:
        await pool.start()
        times = []
        for i in range(runs):
            await pool.start()  # let the spare refill, as it would between two new dialogs
            await asyncio.sleep(0.5)
            t0 = time.perf_counter()
            res = await pool.execute(f"new-{i}", "1+1")
            times.append(time.perf_counter() - t0)
            assert res.status == "ok", res
        return times
    finally:
        await pool.shutdown_all()


async def big_output() -> tuple[float, float]:
    pool = KernelPool(spare=False)
    try:
        await pool.ensure("big")
        t0 = time.perf_counter()
        res = await pool.execute("big", "print('x' * 10_000_000)")
        ten_mb = time.perf_counter() - t0
        assert res.truncated
        t0 = time.perf_counter()
        res = await pool.execute("big", "for i in range(10**6): print(i)", timeout=600)
        lines = time.perf_counter() - t0
        assert res.truncated
        return ten_mb, lines
    finally:
        await pool.shutdown_all()


# The ways a kernel dies that tests/test_reliability_kernels.py checks are detected; here, how fast.
DEATHS = {"os._exit": "import os\nos._exit(3)", "SIGKILL": "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)"}


async def death_detection(runs: int) -> dict[str, list[float]]:
    """Time from executing code that kills its kernel to the "died" result (the pool polls for death)."""
    pool = KernelPool(spare=False)
    times: dict[str, list[float]] = {how: [] for how in DEATHS}
    try:
        for i in range(runs):
            for how, code in DEATHS.items():
                key = f"dies-{i}-{how}"
                await pool.ensure(key)
                t0 = time.perf_counter()
                res = await pool.execute(key, code, timeout=60)
                times[how].append(time.perf_counter() - t0)
                assert res.status == "died", res
                await pool.shutdown(key)
        return times
    finally:
        await pool.shutdown_all()


def ms(values: list[float]) -> str:
    return f"{statistics.median(values) * 1000:8.1f} ms"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="round trips per side (default 200)")
    parser.add_argument("--first", type=int, default=3, help="first runs per side (default 3)")
    parser.add_argument("--deaths", type=int, default=3, help="kernel deaths timed per way of dying (default 3)")
    parser.add_argument("--big", action="store_true", help="also time a 10 MB print and 10^6 printed lines")
    args = parser.parse_args()

    raw = await raw_round_trips(args.n)
    pooled = await pool_round_trips(args.n)
    warm = await first_runs(True, args.first)
    cold = await first_runs(False, args.first)

    print(f"`1+1` round trip, median of {args.n}:")
    print(f"  raw jupyter_client        {ms(raw)}   (p90 {sorted(raw)[int(0.9 * len(raw))] * 1000:.1f} ms)")
    print(f"  KernelPool.execute        {ms(pooled)}   (p90 {sorted(pooled)[int(0.9 * len(pooled))] * 1000:.1f} ms)")
    print(f"  pool / raw                {statistics.median(pooled) / statistics.median(raw):8.2f}x")
    print(f"first run in a new key (start included), median of {args.first}:")
    print(f"  with the warm spare       {ms(warm)}   (all: {', '.join(f'{t * 1000:.0f}' for t in warm)} ms)")
    print(f"  without a spare           {ms(cold)}   (all: {', '.join(f'{t * 1000:.0f}' for t in cold)} ms)")
    print(f"  without / with            {statistics.median(cold) / statistics.median(warm):8.1f}x")
    if args.deaths:
        deaths = await death_detection(args.deaths)
        print(f"a dying kernel reported as died (execute to result), median of {args.deaths}:")
        for how, values in deaths.items():
            print(f"  {how:<25} {ms(values)}   (max {max(values) * 1000:.0f} ms)")
    if args.big:
        ten_mb, lines = await big_output()
        print("capped outputs (default 200,000-character cap):")
        print(f"  print of 10 MB            {ten_mb * 1000:8.1f} ms")
        print(f"  10^6 printed lines        {lines * 1000:8.1f} ms   (mostly ipykernel's own print cost)")


if __name__ == "__main__":
    asyncio.run(main())
