"""`1+1` through Loopbook's HTTP API vs the raw jupyter_client round trip, and first runs in new dialogs.

Run from the checkout: .venv/bin/python bench/bench_api.py [--n 100] [--first 10]
Targets (issue "Foundation"): API median <= raw median + 10 ms; first run in a new dialog < 0.5 s median.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from apphelpers import Server  # noqa: E402
from bench_kernels import raw_round_trips  # noqa: E402


def ms(xs: list[float]) -> str:
    return f"median {statistics.median(xs) * 1000:7.2f} ms   p90 {sorted(xs)[int(len(xs) * 0.9)] * 1000:7.2f} ms"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--first", type=int, default=10)
    args = ap.parse_args()
    raw = asyncio.run(raw_round_trips(args.n))
    with tempfile.TemporaryDirectory(prefix="lb-bench-api-") as tmp:
        server = Server(Path(tmp), "--model", "/no/model.gguf").start()
        try:
            with server.client() as c:
                did = c.post("/api/dialogs", json={"title": "bench"}).json()["id"]
                mid = c.post(f"/api/dialogs/{did}/messages", json={"type": "code", "source": "1+1"}).json()["id"]
                for _ in range(5):
                    c.post(f"/api/messages/{mid}/run")
                api = []
                for _ in range(args.n):
                    t0 = time.perf_counter()
                    r = c.post(f"/api/messages/{mid}/run")
                    api.append(time.perf_counter() - t0)
                    assert r.json()["status"] == "ok"
                first = []
                for _ in range(args.first):
                    d = c.post("/api/dialogs", json={"title": "first"}).json()["id"]
                    m = c.post(f"/api/dialogs/{d}/messages", json={"type": "code", "source": "print(6*7)"}).json()["id"]
                    time.sleep(1.5)  # let the spare refill, as it would between a user's clicks
                    t0 = time.perf_counter()
                    r = c.post(f"/api/messages/{m}/run")
                    first.append(time.perf_counter() - t0)
                    assert r.json()["status"] == "ok"
        finally:
            server.stop()
    print(f"raw jupyter_client 1+1      {ms(raw)}")
    print(f"Loopbook API 1+1 (HTTP)     {ms(api)}")
    diff = (statistics.median(api) - statistics.median(raw)) * 1000
    print(f"API - raw                   {diff:+.2f} ms   (target <= +10 ms: {'met' if diff <= 10 else 'NOT met'})")
    print(f"first run in a new dialog   {ms(first)}   (target < 500 ms: "
          f"{'met' if statistics.median(first) < 0.5 else 'NOT met'})")


if __name__ == "__main__":
    main()
