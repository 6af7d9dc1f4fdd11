"""A short run of bench/bench_load.py against the shared model server: mixed load, nothing lost."""

import importlib.util
import sys

from apphelpers import ROOT, TOKEN


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_load", ROOT / "bench" / "bench_load.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    return module


def test_five_clients_for_eight_seconds(model_server):
    bench = load_bench()
    out = bench.run_load(model_server.base, TOKEN, clients=5, seconds=8, max_requests=5000)
    assert out["errors"] == [] and out["lost_writes"] == []
    # Counts, not rates (bench_load.py prints requests/s, latencies, the queue depth and model time): each
    # client does every kind of request at least once, whatever the speed of this machine.
    assert out["acknowledged_writes"] >= 5 * 3 + 5 and out["requests"] >= 5 * len(bench.MIX)
    kinds = out["by_kind"]
    for kind in ("read", "edit", "run", "ask_sse", "page_stream", "contend"):
        assert kinds.get(kind, {}).get("n", 0) >= 5, (kind, kinds)
    # Every reply asked for under load came back whole, with its figures (none lost in the model's queue),
    # and /api/model reported the model busy while it worked.
    assert out["generations"] == kinds["ask_sse"]["n"] and 0 < out["busy_share"] <= 1
