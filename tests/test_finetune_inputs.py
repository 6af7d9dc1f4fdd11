"""Bad input to `finetune`: each gets a clear message, and no adapter is registered or left half-written."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dialog import Store
from execfeedback import finetune
from execfeedback.adapters import registry as adapters
from execfeedback.finetune.data import is_oom, turn_weights
from execfeedback.traces import TraceStore
from finetunehelpers import add_solved_traces, base_cache, require_train_extra

require_train_extra()  # the test process never imports transformers: see training_process
pytestmark = [pytest.mark.train, pytest.mark.timeout(900)]
ROOT = Path(__file__).resolve().parent.parent
FAST = ["--lr", "1e-3", "--threads", "1", "--eval-rows", "4", "--base-cache", base_cache(), "--quiet"]


def _nothing_registered(data_dir: Path, name: str) -> None:
    store = Store(data_dir)
    try:
        assert adapters.list_adapters(store) == []
    finally:
        store.close()
    assert not (data_dir / "adapters" / f"{name}.gguf").exists()
    assert not list((data_dir / "adapters").glob("*.tmp")) if (data_dir / "adapters").exists() else True


def _gguf_with_arch(path: Path, arch: str) -> Path:
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), arch=arch)
    w.add_name(f"tiny {arch}")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def enough(tmp_path_factory):
    d = tmp_path_factory.mktemp("enough") / "data"
    store = Store(d)
    add_solved_traces(store, 24, fix_every=2)
    store.close()
    return d


def test_no_traces(tmp_path):
    d = tmp_path / "data"
    store = Store(d)
    ts = TraceStore(store)
    tid = ts.start_trace("eval", task_id="t", model="m", backend="llama")  # one unsolved trace only
    a = ts.add_attempt(tid, [{"role": "user", "content": "Write f."}], round=0, completion="no", exec_status="no_code")
    ts.finish_trace(tid, status="failed", stop_reason="no_code", final_attempt_id=a)
    store.close()
    with pytest.raises(SystemExit, match="No solved traces to train on.*python -m execfeedback eval TRAIN.jsonl"):
        finetune.main(["--data-dir", str(d), "--out", "x", *FAST])
    _nothing_registered(d, "x")


def test_no_store(tmp_path):
    with pytest.raises(SystemExit, match="no Loopbook store in"):
        finetune.main(["--data-dir", str(tmp_path / "nowhere"), "--out", "x", *FAST])


def test_too_few_rows(tmp_path):
    d = tmp_path / "data"
    store = Store(d)
    add_solved_traces(store, 5)
    store.close()
    with pytest.raises(SystemExit, match=r"Only \d training rows.*at least 16.*--min-rows"):
        finetune.main(["--data-dir", str(d), "--out", "x", *FAST])
    _nothing_registered(d, "x")


@pytest.mark.parametrize("arch, said", [("rwkv6", "cannot load from GGUF"), ("bloom", "fused or reshaped")])
def test_a_base_architecture_that_cannot_be_trained(enough, tmp_path, arch, said):
    base = _gguf_with_arch(tmp_path / f"{arch}.gguf", arch)
    with pytest.raises(SystemExit, match=f"architecture '{arch}'.*{said}.*llama.*qwen2"):
        finetune.main(["--data-dir", str(enough), "--out", "x", "--base", str(base), *FAST])
    _nothing_registered(enough, "x")


def test_a_missing_base_and_an_adapter_as_base(enough, tmp_path):
    with pytest.raises(SystemExit, match="--base /no/such.gguf.*does not exist"):
        finetune.main(["--data-dir", str(enough), "--out", "x", "--base", "/no/such.gguf", *FAST])
    from execfeedback.adapters.gguf_file import write_gguf
    import numpy as np

    lora = tmp_path / "lora.gguf"
    write_gguf(lora, arch="llama", alpha=8, tensors=[("blk.0.attn_q.weight.lora_a", np.zeros((2, 8), np.float16))])
    with pytest.raises(SystemExit, match="is a LoRA adapter, not a base model"):
        finetune.main(["--data-dir", str(enough), "--out", "x", "--base", str(lora), *FAST])


def test_bad_exports_and_settings(enough, tmp_path):
    with pytest.raises(SystemExit, match="no such directory"):
        finetune.main(["--data-dir", str(enough), "--out", "x", "--export", str(tmp_path / "none"), *FAST])
    (tmp_path / "e").mkdir()
    with pytest.raises(SystemExit, match="no sft.train.jsonl"):
        finetune.main(["--data-dir", str(enough), "--out", "x", "--export", str(tmp_path / "e"), *FAST])
    (tmp_path / "e" / "sft.train.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    with pytest.raises(SystemExit, match="line 1: an SFT row must end with the assistant's answer"):
        finetune.main(["--data-dir", str(enough), "--out", "x", "--export", str(tmp_path / "e"), *FAST])
    with pytest.raises(SystemExit, match="--dpo needs preference pairs"):
        finetune.main(["--data-dir", str(enough), "--out", "x", "--export", str(tmp_path / "e"), "--dpo", *FAST])
    with pytest.raises(SystemExit, match="--lr must be positive"):
        finetune.main(["--data-dir", str(enough), "--out", "x", "--lr", "0"])
    with pytest.raises(SystemExit, match="name '../x' is not allowed"):
        finetune.main(["--data-dir", str(enough), "--out", "../x"])
    _nothing_registered(enough, "x")


def test_turn_weights_put_the_fix_above_all():
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a0"},
            {"role": "user", "content": "error"}, {"role": "assistant", "content": "a1"}]
    assert turn_weights(msgs) == [None, None, 0.0, None, 2.0]
    assert turn_weights(msgs[:3]) == [None, None, 1.0]
    assert turn_weights(msgs, fix_weight=3.0, failed_weight=0.5) == [None, None, 0.5, None, 3.0]


def test_a_real_allocation_failure_is_recognised():
    import torch

    with pytest.raises(RuntimeError) as e:
        torch.empty(2 ** 60, dtype=torch.uint8)
    assert is_oom(e.value)
    assert not is_oom(RuntimeError("shape mismatch"))


@pytest.mark.slow
def test_running_out_of_memory_says_what_to_change_and_keeps_a_checkpoint(enough):
    """A real OOM: once the run has checkpointed step 1, its address space is capped at what it uses."""
    ck = enough / "finetune" / "oom" / "checkpoint" / "state.json"
    cmd = [sys.executable, "-m", "execfeedback", "finetune", "--data-dir", str(enough), "--out", "oom", "--base",
           "smollm2-135m", "--max-steps", "6", "--save-every", "1", "--batch-size", "8", *FAST]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 600
        while proc.poll() is None and not ck.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()
        with open(f"/proc/{proc.pid}/status") as f:
            size = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize"))
        resource.prlimit(proc.pid, resource.RLIMIT_AS, (size, size))
        out, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1, err
    assert "Out of RAM at step" in err and "--batch-size 4 --grad-accum 2" in err and "--max-length" in err
    assert json.loads(ck.read_text())["step"] >= 1  # the run can resume with the smaller batch
    _nothing_registered(enough, "oom")


def test_a_rising_held_out_loss_is_warned_about():
    from execfeedback.finetune.pipeline import overfit_warning

    assert overfit_warning({"test_loss_before": 0.19588, "test_loss_after": 0.22483}, 34).startswith(
        "Warning: the held-out loss rose (0.19588 -> 0.22483): the adapter fits its 34 training rows")
    assert overfit_warning({"test_loss_before": 0.2, "test_loss_after": 0.1}, 34) is None
    assert overfit_warning({"test_loss_before": None, "test_loss_after": None}, 34) is None
