"""Fine-tuning end to end with the real SmolLM2-135M GGUF: store -> export -> LoRA -> GGUF adapter -> llama.cpp.

A few dozen rows and a few steps at a high learning rate: enough for the loss to fall and the
greedy output to change, small enough for CI (the first test dequantizes the GGUF once; the rest
load the cached base).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dialog import Store
from execfeedback import finetune
from execfeedback.adapters import registry as adapters
from finetunehelpers import SYSTEM, add_solved_traces, base_cache, interrupt_after_step, require_train_extra
from local_model.gguf import sha256_file
from parts import smollm2_path

require_train_extra()  # the test process never imports transformers: see training_process
pytestmark = [pytest.mark.train, pytest.mark.timeout(900)]
ROOT = Path(__file__).resolve().parent.parent
FAST = ["--base", "smollm2-135m", "--lr", "1e-3", "--batch-size", "4", "--threads", "1", "--eval-rows", "4",
        "--base-cache", base_cache(), "--quiet"]
PROMPT = [{"role": "system", "content": SYSTEM},
          {"role": "user", "content": "Write a Python function times_99(x) that returns x * 99."}]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("finetune") / "data"
    store = Store(d)
    add_solved_traces(store, 40, fix_every=2)
    store.close()
    return d


@pytest.fixture(scope="module")
def trained(data_dir):
    """One real run: 8 steps over 40 traces (20 fixed after a NameError, 20 right at once)."""
    rc = finetune.main(["--data-dir", str(data_dir), "--out", "fix-v1", "--max-steps", "8", *FAST])
    assert rc == 0
    store = Store(data_dir)
    try:
        yield adapters.get(store, "fix-v1")
    finally:
        store.close()


def _greedy(lora: str | None) -> str:
    from local_model.backends.llama import new_llama

    llm = new_llama(model_path=str(smollm2_path()), lora_path=lora, n_ctx=512, n_threads=1, verbose=False, seed=0)
    try:
        out = llm.create_chat_completion(PROMPT, temperature=0.0, max_tokens=32, seed=0)
        return out["choices"][0]["message"]["content"]
    finally:
        llm.close()


def test_the_loss_falls_and_the_record_says_what_was_trained(trained, data_dir):
    t, e, h = trained["training"], trained["export"], trained["hyperparameters"]
    assert t["steps"] == 8 and t["train_loss_after"] < t["train_loss_before"]
    assert t["loss_last"] < t["loss_first"]
    assert e["used_rows"] + e["test_rows_used"] <= 40 and e["fix_rows"] > 0 and e["first_rows"] > 0
    assert e["files"]["sft.train.jsonl"] == e["used_rows"] and len(e["hash"]) == 64
    assert h["lora_r"] == 16 and h["fix_weight"] == 2.0 and h["failed_weight"] == 0.0
    assert trained["base_sha256"] == sha256_file(smollm2_path()) and trained["architecture"] == "llama"
    assert t["train_tokens"] > 0 and t["device"] == "cpu"
    # 8 steps end inside the first epoch: one held-out figure, and those weights are the ones kept.
    assert len(t["epoch_test_losses"]) == 1 and t["best_epoch"] == t["kept_epoch"] == 1 and h["keep"] == "best"
    assert t["test_loss_after"] == t["epoch_test_losses"][0] < t["test_loss_before"]
    assert t["no_held_out_gain"] is False
    run = json.loads((data_dir / "finetune" / "fix-v1" / "run.json").read_text())
    assert len(run["losses"]) == 8
    assert not (data_dir / "finetune" / "fix-v1" / "checkpoint").exists()  # done: nothing left to resume


def test_the_adapter_loads_in_llama_cpp_and_changes_the_greedy_output(trained):
    path = Path(trained["path"])
    assert path.stat().st_size == trained["size_bytes"] < 20 * 2**20
    embedded = adapters.read_embedded(path)
    assert embedded["record"]["name"] == "fix-v1" and embedded["alpha"] == 32.0
    base, tuned = _greedy(None), _greedy(str(path))
    assert tuned != base


def test_the_app_path_checks_the_base(trained, data_dir):
    store = Store(data_dir)
    try:
        assert adapters.lora_path_for(store, "fix-v1", trained["base_sha256"]) == trained["path"]
        with pytest.raises(adapters.BaseMismatch, match="was trained on SmolLM2"):
            adapters.lora_path_for(store, "fix-v1", "ab" * 32)
    finally:
        store.close()


def test_a_second_run_of_the_same_name_is_refused(trained, data_dir, capsys):
    with pytest.raises(SystemExit, match="adapter named 'fix-v1' exists already.*--replace"):
        finetune.main(["--data-dir", str(data_dir), "--out", "fix-v1", "--max-steps", "1", *FAST])


def _cmd(data_dir: Path, name: str, steps: int) -> list[str]:
    return [sys.executable, "-m", "execfeedback", "finetune", "--data-dir", str(data_dir), "--out", name,
            "--max-steps", str(steps), "--save-every", "1", *FAST]


def test_an_interrupted_run_registers_nothing_and_resumes(trained, data_dir):
    ck = data_dir / "finetune" / "resumed" / "checkpoint" / "state.json"
    rc, _, err = interrupt_after_step(_cmd(data_dir, "resumed", 5), ck, ROOT)
    assert rc == 130, err
    assert "Run the same command again to resume" in err
    stopped_at = json.loads(ck.read_text())["step"]
    assert 2 <= stopped_at < 5
    store = Store(data_dir)
    try:
        assert not adapters.exists(store, "resumed")
    finally:
        store.close()
    assert not (data_dir / "adapters" / "resumed.gguf").exists()

    # Other settings do not silently continue that checkpoint (checked before the model loads).
    with pytest.raises(SystemExit, match="was made with other data, hyperparameters or base model .lora_r 16 then, "
                                         "8 now.*--restart"):
        finetune.main(["--data-dir", str(data_dir), "--out", "resumed", "--max-steps", "5", *FAST, "--lora-r", "8"])

    again = subprocess.run(_cmd(data_dir, "resumed", 5)[:-1], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert f"Resuming from the checkpoint at step {stopped_at} of 5" in again.stderr
    store = Store(data_dir)
    try:
        rec = adapters.get(store, "resumed")
    finally:
        store.close()
    assert rec["training"]["resumed_at"] == stopped_at and rec["training"]["steps"] == 5
    assert len(rec["training"]["epoch_test_losses"]) == 1 and rec["training"]["kept_epoch"] == 1
    run = json.loads((data_dir / "finetune" / "resumed" / "run.json").read_text())
    assert len(run["losses"]) == 5


@pytest.mark.slow
def test_sft_then_dpo_on_the_preference_pairs(trained, data_dir):
    require_train_extra("trl")  # --dpo needs trl
    rc = finetune.main(["--data-dir", str(data_dir), "--out", "fix-dpo", "--max-steps", "1", "--dpo",
                        "--dpo-max-steps", "2", "--dpo-lr", "1e-4", *FAST, "--batch-size", "2"])
    assert rc == 0
    store = Store(data_dir)
    try:
        rec = adapters.get(store, "fix-dpo")
    finally:
        store.close()
    dpo = rec["training"]["dpo"]
    assert rec["method"] == "sft+dpo" and dpo["steps"] == 2 and len(dpo["losses"]) == 2 and dpo["pairs"] > 0
    assert rec["export"]["files"]["preference.train.jsonl"] == dpo["pairs"]
    assert not (data_dir / "finetune" / "fix-dpo" / "dpo").exists()
    assert adapters.read_embedded(rec["path"])["record"]["method"] == "sft+dpo"


def test_the_eval_runs_with_the_adapter_and_names_it(trained, data_dir, tmp_path):
    import argparse
    import contextlib
    import io

    from execfeedback.eval.cli import add_arguments, run

    out = tmp_path / "results.json"
    args = add_arguments(argparse.ArgumentParser()).parse_args(
        [str(ROOT / "execfeedback/eval/problem_sets/loopbook-30.jsonl"), "--model", "smollm2-135m", "--adapter", "fix-v1",
         "--no-base", "--limit", "1", "--rounds", "0", "--max-tokens", "48", "--quiet", "--data-dir", str(data_dir),
         "--out", str(out)])
    store = Store(data_dir)
    try:
        runs_before = {r["name"] for r in store.query("SELECT name FROM eval_runs")}
    finally:
        store.close()
    with contextlib.redirect_stdout(io.StringIO()) as said, contextlib.redirect_stderr(io.StringIO()):
        assert run(args) == 0
    results = json.loads(out.read_text())
    summary = results["summary"]
    assert summary["manifest"]["adapter"] == "fix-v1" and "fix-v1" in summary["run_name"]
    # --no-base: the adapter alone, no base run and no side-by-side table.
    assert results["comparison"]["base_run"] is None and results["comparison"]["left_out_train_tasks"] == []
    assert "round  base" not in said.getvalue()
    store = Store(data_dir)
    try:
        runs = {r["name"]: r["id"] for r in store.query("SELECT id, name FROM eval_runs")}
        assert set(runs) - runs_before == {summary["run_name"]}
        rows = store.query("SELECT manifest FROM attempts WHERE trace_id IN "
                           "(SELECT id FROM traces WHERE eval_run_id = ?)", (runs[summary["run_name"]],))
        assert rows and all(json.loads(r["manifest"])["adapter"] == "fix-v1" for r in rows)
    finally:
        store.close()
    args = add_arguments(argparse.ArgumentParser()).parse_args(
        [str(ROOT / "execfeedback/eval/problem_sets/loopbook-30.jsonl"), "--model", "smollm2-135m", "--adapter", "nope",
         "--limit", "1", "--quiet", "--data-dir", str(data_dir)])
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert run(args) != 0


def _eval(data_dir: Path, problems: Path, *extra: str) -> tuple[int, str, str]:
    import argparse
    import contextlib
    import io

    from execfeedback.eval.cli import add_arguments, run

    args = add_arguments(argparse.ArgumentParser()).parse_args(
        [str(problems), "--model", "smollm2-135m", "--limit", "2", "--rounds", "1", "--max-tokens", "32", "--quiet",
         "--data-dir", str(data_dir), *extra])
    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(io.StringIO()) as err:
        rc = run(args)
    return rc, out.getvalue(), err.getvalue()


def _problems_with(path: Path, first_id: str | None, n: int = 3) -> Path:
    """The first n shipped problems; the first one renamed to `first_id` (a training task) when given."""
    lines = (ROOT / "execfeedback/eval/problem_sets/loopbook-30.jsonl").read_text().splitlines()[:n]
    rows = [json.loads(line) for line in lines]
    if first_id is not None:
        rows[0]["id"] = first_id
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_the_record_lists_the_training_tasks_of_the_split(trained):
    tasks = trained["export"]["train_tasks"]
    # 40 eval traces, one task each: every train row is one task, named by its problem id.
    assert len(tasks) == trained["export"]["files"]["sft.train.jsonl"] and tasks == sorted(tasks)
    assert set(tasks) < {f"task-{i}" for i in range(40)}
    assert "training tasks:" in adapters.card(trained)


def test_eval_adapter_compares_with_the_base_on_held_out_problems(trained, data_dir, tmp_path):
    train_id = trained["export"]["train_tasks"][0]
    problems = _problems_with(tmp_path / "mixed.jsonl", train_id)
    out = tmp_path / "cmp.json"
    rc, said, err = _eval(data_dir, problems, "--adapter", "fix-v1", "--name", "cmp", "--out", str(out))
    assert rc == 0, err
    assert f"left out 1 problem(s) that adapter 'fix-v1' was trained on: {train_id}" in err
    assert "round  base              adapter           change" in said
    assert "regressions (pass -> fail between rounds): base" in said
    results = json.loads(out.read_text())
    held_out = [p["id"] for p in results["problems"]]
    assert len(held_out) == 2 and train_id not in held_out
    cmp = results["comparison"]
    assert cmp["base_run"] == "cmp-base" and cmp["left_out_train_tasks"] == [train_id]
    assert cmp["adapter_pass_by_round"] == results["summary"]["pass_by_round"] and len(cmp["base_pass_by_round"]) == 2
    store = Store(data_dir)
    try:
        runs = {r["name"]: r["id"] for r in store.query("SELECT id, name FROM eval_runs")}
        for name, adapter in (("cmp-base", None), ("cmp", "fix-v1")):
            rows = store.query("SELECT t.task_id, a.manifest FROM traces t JOIN attempts a ON a.trace_id = t.id "
                               "WHERE t.eval_run_id = ?", (runs[name],))
            assert {r["task_id"] for r in rows} == set(held_out)
            assert {json.loads(r["manifest"]).get("adapter") for r in rows} == {adapter}
        rec = adapters.get(store, "fix-v1")
        n_traces = store.query("SELECT count(*) AS n FROM traces")[0]["n"]
    finally:
        store.close()
    assert rec["eval_before"]["run_name"] == "cmp-base" and rec["eval_after"]["run_name"] == "cmp"
    assert rec["eval_after"]["pass_by_round"] == cmp["adapter_pass_by_round"]
    assert "Problems: base run `cmp-base` (2 problems), adapter run `cmp` (2 problems)" in adapters.card(rec)

    # The same command resumes both runs: nothing runs again.
    rc, said, err = _eval(data_dir, problems, "--adapter", "fix-v1", "--name", "cmp", "--out", str(out))
    assert rc == 0 and "Resuming eval run 'cmp-base': 2 problem(s) already done, 0 to run" in err
    store = Store(data_dir)
    try:
        assert store.query("SELECT count(*) AS n FROM traces")[0]["n"] == n_traces
    finally:
        store.close()

    # Only training tasks: nothing to compare on.
    only = tmp_path / "train-only.jsonl"
    only.write_text(json.dumps({**json.loads(problems.read_text().splitlines()[0])}) + "\n")
    rc, _, err = _eval(data_dir, only, "--adapter", "fix-v1")
    assert rc == 2 and "is a training task of adapter 'fix-v1'" in err


def test_an_adapter_without_training_tasks_cannot_be_checked(trained, data_dir, tmp_path):
    store = Store(data_dir)
    try:
        folder = adapters.adapters_dir(store)
        (folder / "fix-old.gguf").write_bytes(Path(trained["path"]).read_bytes())
        old = {**trained, "name": "fix-old", "file_name": "fix-old.gguf",
               "export": {k: v for k, v in trained["export"].items() if k != "train_tasks"}}
        adapters.register(store, old)
    finally:
        store.close()
    rc, _, err = _eval(data_dir, _problems_with(tmp_path / "p.jsonl", None, n=1), "--adapter", "fix-old", "--no-base",
                       "--rounds", "0", "--max-tokens", "8", "--name", "old")
    assert rc == 0, err
    assert "adapter 'fix-old' does not record its training tasks" in err and "cannot check" in err


def test_the_app_picks_an_adapter_per_dialog_and_names_it(trained, data_dir):
    sys.path.insert(0, str(ROOT / "tests"))
    from apphelpers import Server, wait_for_model

    s = Server(data_dir, "--model", "smollm2-135m", "--max-tokens", "8").start()
    try:
        with s.client() as c:
            wait_for_model(c)
            did = c.post("/api/dialogs", json={"title": "tuned"}).json()["id"]
            assert c.patch(f"/api/dialogs/{did}", json={"settings": {"adapter": "nope"}}).status_code == 404
            assert c.patch(f"/api/dialogs/{did}", json={"settings": {"adapter": "fix-v1"}}).status_code == 200
            mid = c.post(f"/api/dialogs/{did}/messages", json={"type": "prompt", "source": "hi"}).json()["id"]
            r = c.post(f"/api/messages/{mid}/ask", json={})
            assert r.status_code == 200, r.text
            assert r.json()["manifest"]["adapter"] == "fix-v1"
            other = c.post("/api/dialogs", json={"title": "base"}).json()["id"]
            mid2 = c.post(f"/api/dialogs/{other}/messages", json={"type": "prompt", "source": "hi"}).json()["id"]
            assert "adapter" not in c.post(f"/api/messages/{mid2}/ask", json={}).json()["manifest"]
    finally:
        s.stop()
