"""Stores of solved traces for the fine-tuning tests, written through the real TraceStore API."""

from __future__ import annotations

import atexit
import json
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from dialog import Store
from execfeedback.loop.feedback import feedback_message
from execfeedback.traces import TraceStore
from parts import require_module

SYSTEM = "You write Python. Answer with one fenced code block."
OPS = [("times", "*"), ("plus", "+"), ("minus", "-"), ("mod", "%")]


TRAIN_EXTRA = ("torch", "transformers", "peft", "gguf", "safetensors", "accelerate")


def require_train_extra(*more: str) -> None:
    """Skip when the train extra is not installed (under CI=true, conftest makes that a failure).

    find_spec, not import: transformers imported into the test process would find our `kernels` package
    instead of Hugging Face's. Training runs in its own process (execfeedback/finetune/training_process.py).
    """
    for module in (*TRAIN_EXTRA, *more):
        require_module(module, "train", import_it=False)


_BASE_CACHE: list[str] = []


def base_cache() -> str:
    """One folder per test process for the dequantized base, so the GGUF is dequantized once per run."""
    if not _BASE_CACHE:
        _BASE_CACHE.append(tempfile.mkdtemp(prefix="loopbook-base-cache-"))
        atexit.register(shutil.rmtree, _BASE_CACHE[0], True)
    return _BASE_CACHE[0]


def fenced(code: str) -> str:
    return f"Here is the function.\n\n```python\n{code.rstrip()}\n```"


def add_solved_traces(store: Store, n: int, *, fix_every: int = 1, start: int = 0) -> list[int]:
    """n solved traces over distinct tasks; every `fix_every`-th one fails once (NameError) and is fixed."""
    ts = TraceStore(store)
    ids = []
    manifest = {"backend": "llama", "model": "smollm2-135m", "sha256": "00" * 32}
    for i in range(start, start + n):
        word, op = OPS[i % len(OPS)]
        k = 3 + i
        fname = f"{word}_{k}"
        prompt = f"Write a Python function {fname}(x) that returns x {op} {k}."
        good = f"def {fname}(x):\n    return x {op} {k}\n"
        context = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]
        tid = ts.start_trace("eval", task_id=f"task-{i}", task_source="finetune-test", model="smollm2-135m",
                             backend="llama", manifest=manifest)
        common = dict(candidate=0, task_id=f"task-{i}", task_source="finetune-test", extracted=True,
                      manifest=manifest, completion_tokens=20, prompt_tokens=60)
        rnd = 0
        if i % fix_every == 0:
            bad = f"def {fname}(x):\n    return x {op} k\n"
            obs = {"status": "error", "ename": "NameError", "evalue": "name 'k' is not defined",
                   "traceback": ["Traceback (most recent call last):", f"    return x {op} k",
                                 "NameError: name 'k' is not defined"]}
            fb = feedback_message(obs)
            ts.add_attempt(tid, context, round=0, completion=fenced(bad), code=bad, exec_status="error",
                           passed=False, ename="NameError", evalue="name 'k' is not defined",
                           traceback=obs["traceback"], feedback=fb, **common)
            context = context + [{"role": "assistant", "content": fenced(bad)}, {"role": "user", "content": fb}]
            rnd = 1
        a = ts.add_attempt(tid, context, round=rnd, completion=fenced(good), code=good, exec_status="ok", passed=True,
                           hidden_passed=True, **common)
        ts.finish_trace(tid, status="passed", stop_reason="passed", final_attempt_id=a, hidden_passed=True)
        ids.append(tid)
    return ids


def interrupt_after_step(cmd: list[str], state: Path, cwd: Path, step: int = 2) -> tuple[int, str, str]:
    """Run a finetune command and press Ctrl-C once its checkpoint reaches `step`: (exit code, stdout, stderr)."""
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if json.loads(state.read_text())["step"] >= step:
                    break
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.1)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, out, err
