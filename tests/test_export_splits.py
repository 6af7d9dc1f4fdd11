"""Held-out splits: deterministic from the seed, and no task (or dialog) on both sides."""

import json

import pytest
from exporthelpers import ask, solved_trace

from execfeedback.export.exporter import ExportError, export_to_dir, options_from_mapping
from execfeedback.traces import TraceStore

N_TASKS = 12


@pytest.fixture(scope="module")
def split_store(tmp_path_factory):
    """Eval tasks met by two runs and several models; notebook prompts repeated across dialogs."""
    from dialog import Store

    store = Store(tmp_path_factory.mktemp("split") / "data")
    ts = TraceStore(store)
    runs = [ts.start_eval_run(name)["id"] for name in ("nightly", "heldout")]
    for run in runs:
        for model in ("smollm2-135m", "qwen2.5-coder-1.5b"):
            for i in range(N_TASKS):
                solved_trace(ts, ask(f"Write task_{i}(x) returning x * {i}."), f"def task_{i}(x):\n    return x * {i}\n",
                             model=model, task_id=f"t{i}", eval_run_id=run, failing="def f(:\n" if i % 3 else None)
    dialogs = [store.create_dialog(f"d{j}")["id"] for j in range(8)]
    for j, d in enumerate(dialogs):
        # The same request in two dialogs (d0/d1, d2/d3, ...): one task across dialogs.
        solved_trace(ts, ask(f"Plot series {j // 2}."), f"plot({j // 2})\n", dialog_id=d, prose=f"Take {j}.")
        solved_trace(ts, ask(f"Describe dialog {j}."), f"describe({j})\n", dialog_id=d)
    yield store
    store.close()


def task_of(row: dict) -> str:
    return row["task_id"] or row["prompt"][-1]["content"]


def export_splits(store, out, **values) -> dict[str, list[dict]]:
    export_to_dir(store, out, options_from_mapping({"format": "trajectory", "dedup": "none", **values}), environ={})
    return {s: [json.loads(x) for x in (out / f"trajectory.{s}.jsonl").read_text().splitlines()]
            if (out / f"trajectory.{s}.jsonl").exists() else [] for s in ("train", "test")}


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4, 5])
def test_no_task_is_in_both_train_and_test(split_store, tmp_path, seed):
    parts = export_splits(split_store, tmp_path / "o", test_fraction="0.3", seed=str(seed))
    train, test = ({task_of(r) for r in parts[s]} for s in ("train", "test"))
    assert not train & test
    assert len(parts["train"]) + len(parts["test"]) == 2 * 2 * N_TASKS + 16


def test_split_is_deterministic_and_follows_the_seed(split_store, tmp_path):
    a = export_splits(split_store, tmp_path / "a", test_fraction="0.5", seed="7")
    b = export_splits(split_store, tmp_path / "b", test_fraction="0.5", seed="7")
    assert a == b and a["train"] and a["test"]
    tasks = {s: {task_of(r) for r in a[s]} for s in a}
    others = [export_splits(split_store, tmp_path / f"c{s}", test_fraction="0.5", seed=str(s)) for s in (8, 9)]
    assert any({task_of(r) for r in o["test"]} != tasks["test"] for o in others)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_split_by_dialog_keeps_dialogs_and_shared_tasks_together(split_store, tmp_path, seed):
    parts = export_splits(split_store, tmp_path / "o", split_by="dialog", test_fraction="0.4", seed=str(seed))
    for key in ("dialog_id", None):
        get = (lambda r: r["dialog_id"]) if key else task_of
        train = {get(r) for r in parts["train"] if r["dialog_id"] or not key}
        test = {get(r) for r in parts["test"] if r["dialog_id"] or not key}
        assert not train & test


def test_excluded_eval_runs_stay_out_of_train(split_store, tmp_path):
    parts = export_splits(split_store, tmp_path / "o", test_fraction="0", exclude_eval_run="heldout")
    assert not any(r["eval_run"] for r in parts["train"])  # every eval task was also in heldout
    assert {r["task_id"] for r in parts["test"]} == {f"t{i}" for i in range(N_TASKS)}
    assert len(parts["train"]) == 16
    card = (tmp_path / "o" / "README.md").read_text()
    assert "Eval runs kept out of train: heldout" in card
    with pytest.raises(ExportError, match="Eval runs in this store: nightly, heldout"):
        export_splits(split_store, tmp_path / "p", exclude_eval_run="weekly")


def test_worker_processes_write_exactly_what_one_process_writes(tmp_path):
    """Over PARALLEL_MIN traces the CLI forks workers; the merge must reproduce the single-process files."""
    import sys
    from pathlib import Path

    from dialog import Store
    from execfeedback.export.exporter import PARALLEL_MIN

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    from bench_export import fill

    info = fill(tmp_path / "data", 5000, seed=3)
    assert info["traces"] > PARALLEL_MIN
    store = Store(tmp_path / "data")
    try:
        opts = options_from_mapping({"format": "sft,preference,kto,corrections", "test_fraction": "0.2"})
        one = export_to_dir(store, tmp_path / "one", opts, environ={}, workers=1)
        two = export_to_dir(store, tmp_path / "two", opts, environ={}, workers=2)
    finally:
        store.close()
    assert one.files == two.files and one.dedup == two.dedup and one.secrets == two.secrets
    assert one.stats == two.stats
    assert one.tasks == two.tasks and one.tasks["train"] and one.tasks["test"]
    for name in one.files:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
