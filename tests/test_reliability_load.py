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
    out = load_bench().run_load(model_server.base, TOKEN, clients=5, seconds=8, max_requests=5000)
    assert out["errors"] == [] and out["lost_writes"] == []
    assert out["acknowledged_writes"] >= 5 * 3 + 5 and out["requests"] >= 5 * 8
    kinds = out["by_kind"]
    for kind in ("read", "edit", "run", "ask_sse", "page_stream", "contend"):
        assert kinds.get(kind, {}).get("n", 0) >= 1, (kind, kinds)
    # Generations queue behind one another on the one in-process model: their summed model time fits in
    # the wall time, and the queue was seen (depth is what /api/model reports).
    assert out["generations"] >= 1 and out["generation_s"] <= out["seconds"] + 1
    assert out["max_queue_depth"] >= 0 and 0 < out["busy_share"] <= 1
