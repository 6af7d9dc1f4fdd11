"""Keeping the epoch with the lowest held-out loss, with the real SmolLM2-135M on the CPU.

The held-out answers are refusals while every training answer is code: the first epochs learn what
both share (the chat format, the end of a turn) and the held-out loss falls; the third learns the
code and it rises again, as when a few dozen rows are overfit. Measured here with --seed 0:
3.89 (base) -> 3.64 -> 3.54 -> 3.61, so epoch 2 must be kept. 8 training rows, 2 steps an epoch.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from dialog import Store
from execfeedback.finetune import pipeline as finetune
from execfeedback.adapters import registry as adapters
from execfeedback.finetune.train import BEST, read_best_label
from finetunehelpers import OPS, SYSTEM, base_cache, fenced, interrupt_after_step, require_train_extra

require_train_extra()  # the test process never imports transformers: see training_process
pytestmark = [pytest.mark.train, pytest.mark.timeout(900)]
ROOT = Path(__file__).resolve().parent.parent
TOL = 2e-4  # figures are rounded to 5 places


def _row(i: int, answer: str | None = None) -> dict:
    word, op = OPS[i % len(OPS)]
    k = 3 + i
    prompt = f"Write a Python function {word}_{k}(x) that returns x {op} {k}."
    answer = answer or fenced(f"def {word}_{k}(x):\n    return x {op} {k}\n")
    return {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt},
                         {"role": "assistant", "content": answer}]}


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    d = tmp_path_factory.mktemp("selection") / "export"
    d.mkdir()
    (d / "sft.train.jsonl").write_text("".join(json.dumps(_row(i)) + "\n" for i in range(8)))
    refusal = "I would rather not write that function; please ask someone else."
    (d / "sft.test.jsonl").write_text("".join(json.dumps(_row(i, refusal)) + "\n" for i in range(40, 42)))
    return d


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("selection") / "data"
    Store(d).close()
    return d


def _args(data_dir: Path, export: Path, name: str, *extra: str) -> list[str]:
    return ["--data-dir", str(data_dir), "--export", str(export), "--out", name, "--base", "smollm2-135m",
            "--epochs", "3", "--lr", "1e-3", "--batch-size", "4", "--min-rows", "8", "--threads", "1",
            "--eval-rows", "4", "--base-cache", base_cache(), "--quiet", *extra]


def _record(data_dir: Path, name: str) -> dict:
    store = Store(data_dir)
    try:
        return adapters.get(store, name)
    finally:
        store.close()


@pytest.fixture(scope="module")
def best_run(data_dir, export):
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert finetune.main(_args(data_dir, export, "sel-best")) == 0
    return _record(data_dir, "sel-best"), out.getvalue()


def test_the_best_epoch_is_kept(best_run, data_dir):
    rec, printed = best_run
    t = rec["training"]
    measured = t["epoch_test_losses"]
    assert t["steps"] == 6 and t["steps_per_epoch"] == 2 and len(measured) == 3
    assert t["test_loss_before"] > measured[0] > measured[1] < measured[2]
    assert t["best_epoch"] == t["kept_epoch"] == 2 and t["no_held_out_gain"] is False and t["keep"] == "best"
    assert rec["hyperparameters"]["keep"] == "best"
    # The figure after training is measured again on the weights put back: it is epoch 2's loss.
    assert abs(t["test_loss_after"] - min(measured)) < TOL
    label = read_best_label(data_dir / "finetune" / "sel-best")
    assert (data_dir / "finetune" / "sel-best" / BEST).is_file() and label["epoch"] == 2 and label["step"] == 4
    assert abs(label["test_loss"] - measured[1]) < TOL
    trail = " -> ".join(f"{x:.3g}" for x in [t["test_loss_before"], *measured])
    assert f"Kept epoch 2 of 3, by the lowest held-out loss (held-out loss {trail})." in printed
    assert "Warning" not in printed


def _cmd(data_dir: Path, export: Path, name: str) -> list[str]:
    return [sys.executable, "-m", "execfeedback", "finetune", *_args(data_dir, export, name, "--keep", "last",
                                                                  "--save-every", "1")]


def test_keep_last_and_a_resumed_run_carries_the_best_epoch(best_run, data_dir, export):
    """Interrupted after epoch 1, resumed: the same figures as the run above, but the last weights kept."""
    ck = data_dir / "finetune" / "sel-last" / "checkpoint" / "state.json"
    rc, _, err = interrupt_after_step(_cmd(data_dir, export, "sel-last"), ck, ROOT)
    assert rc == 130, err
    state = json.loads(ck.read_text())
    so_far = state["epoch_test_losses"]
    assert 2 <= state["step"] < 6 and len(so_far) == state["step"] // 2
    assert state["best_epoch"] == so_far.index(min(so_far)) + 1 and state["best_step"] == 2 * state["best_epoch"]
    assert read_best_label(data_dir / "finetune" / "sel-last")["step"] == state["best_step"]

    assert finetune.main(_args(data_dir, export, "sel-last", "--keep", "last", "--save-every", "1")) == 0
    rec, best = _record(data_dir, "sel-last"), best_run[0]
    t = rec["training"]
    assert t["resumed_at"] == state["step"] and rec["hyperparameters"]["keep"] == "last"
    assert all(abs(a - b) < TOL for a, b in zip(t["epoch_test_losses"], best["training"]["epoch_test_losses"],
                                                 strict=True))
    assert t["best_epoch"] == 2 and t["kept_epoch"] == 3 and t["no_held_out_gain"] is False
    assert abs(t["test_loss_after"] - t["epoch_test_losses"][-1]) < TOL
    assert rec["sha256"] != best["sha256"]  # other weights in the adapter


def test_without_held_out_rows_the_last_weights_are_kept(data_dir, export, tmp_path, capsys):
    (tmp_path / "sft.train.jsonl").write_text((export / "sft.train.jsonl").read_text())
    assert finetune.main([*_args(data_dir, tmp_path, "sel-none"), "--max-steps", "2"]) == 0
    t = _record(data_dir, "sel-none")["training"]
    assert t["test_rows"] == 0 and t["steps"] == 2 and t["test_loss_after"] is None
    assert t["epoch_test_losses"] == [] and t["best_epoch"] is None and t["kept_epoch"] is None
    assert not (data_dir / "finetune" / "sel-none" / BEST).exists()
    assert "Kept epoch" not in capsys.readouterr().out


FIGURES = {"test_loss_before": 0.196, "epoch_test_losses": [0.201, 0.214, 0.225], "best_epoch": 1, "epochs_done": 3.0}


def test_the_summary_names_the_kept_epoch_and_warns_when_training_never_beat_the_base():
    kept_best = {**FIGURES, "keep": "best", "kept_epoch": 1, "test_loss_after": 0.201, "no_held_out_gain": True}
    assert finetune.kept_epoch_line(kept_best) == ("Kept epoch 1 of 3, by the lowest held-out loss (held-out loss "
                                                   "0.196 -> 0.201 -> 0.214 -> 0.225).")
    warning = finetune.overfit_warning(kept_best, 34)
    assert warning.startswith("Warning: the held-out loss never went below the base's (0.196; the best epoch reached "
                              "0.201). Epoch 1 was kept (0.201)")
    kept_last = {**kept_best, "keep": "last", "kept_epoch": 3, "test_loss_after": 0.225}
    assert finetune.kept_epoch_line(kept_last).endswith("by --keep last (held-out loss 0.196 -> 0.201 -> 0.214 -> "
                                                        "0.225; epoch 1 had the lowest).")
    rose = {**kept_last, "test_loss_before": 0.3, "epoch_test_losses": [0.2, 0.25, 0.31], "test_loss_after": 0.31,
            "no_held_out_gain": False}
    assert "rose (0.3 -> 0.31)" in finetune.overfit_warning(rose, 34)
    assert "Epoch 1 did better; --keep best (the default) keeps it." in finetune.overfit_warning(rose, 34)
    cut = {**rose, "epochs_done": 2.5, "keep": "best", "kept_epoch": 1, "test_loss_after": 0.2}
    assert "Kept epoch 1 of 3 (the last one cut short by --max-steps)" in finetune.kept_epoch_line(cut)
    assert finetune.overfit_warning(cut, 34) is None
    no_held_out = {"test_loss_before": None, "epoch_test_losses": [], "best_epoch": None, "kept_epoch": None}
    assert finetune.kept_epoch_line(no_held_out) is None and finetune.overfit_warning(no_held_out, 34) is None


def test_a_best_file_written_after_the_last_checkpoint_is_adopted_on_resume(tmp_path):
    """A stop between writing best.safetensors and the checkpoint: the file's own label says what it holds."""
    import torch
    from safetensors.torch import save_file

    from execfeedback.finetune.train import _adopt_newer_best

    save_file({"w": torch.zeros(2)}, tmp_path / BEST, metadata={"epoch": "3", "step": "6", "test_loss": "0.18"})
    state = {"step": 4, "best_epoch": 1, "best_step": 2, "best_test_loss": 0.2}
    _adopt_newer_best(tmp_path, state)
    assert (state["best_epoch"], state["best_step"], state["best_test_loss"]) == (3, 6, 0.18)
    behind = {"step": 8, "best_epoch": 3, "best_step": 6, "best_test_loss": 0.18}
    _adopt_newer_best(tmp_path, behind)  # the checkpoint already knows it
    assert behind["best_step"] == 6
    (tmp_path / BEST).write_bytes(b"not safetensors")
    assert read_best_label(tmp_path) is None
