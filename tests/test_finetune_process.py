"""Our `kernels` and Hugging Face's never meet: the training process gets theirs, every other process ours."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import kernels
from execfeedback.finetune.training_process import TrainingProcessError, is_ours, use_hf_kernels
from finetunehelpers import require_train_extra

require_train_extra()
pytestmark = pytest.mark.train
ROOT = Path(__file__).resolve().parent.parent


def _python(code: str, **kw) -> subprocess.CompletedProcess:
    # `-c` from the checkout puts it first on sys.path, as `python -m execfeedback` does.
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300, **kw)


def test_this_process_holds_our_kernels():
    assert is_ours(kernels) and kernels.KernelPool.__module__.startswith("kernels")


def test_the_training_process_imports_transformers_hub_kernels_with_hugging_faces_package():
    proc = _python("from execfeedback.finetune.training_process import use_hf_kernels, is_ours\n"
                   "use_hf_kernels()\n"
                   "import transformers.integrations.hub_kernels, sys\n"
                   "k = sys.modules['kernels']\n"
                   "print('ours' if k is not None and is_ours(k) else 'theirs', getattr(k, '__file__', None))\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[0] == "theirs", proc.stdout
    assert str(ROOT / "kernels") not in proc.stdout


def test_a_process_holding_ours_is_refused_with_what_to_do():
    with pytest.raises(TrainingProcessError, match="Run training in its own process"):
        use_hf_kernels()
    assert sys.modules["kernels"] is kernels  # and ours is untouched


def test_a_broken_extra_is_named_with_its_exception(tmp_path):
    fake = tmp_path / "peft"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError(\"cannot import name 'CUDAProperties' from 'kernels'\")\n")
    proc = subprocess.run([sys.executable, "-m", "execfeedback", "finetune", "--data-dir", str(tmp_path / "d"),
                           "--out", "x"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "PYTHONPATH": str(tmp_path)})
    assert proc.returncode == 1
    assert "could not import peft (ImportError: cannot import name 'CUDAProperties' from 'kernels')" in proc.stderr
    assert "missing: peft" not in proc.stderr


def test_a_missing_extra_is_named_as_missing():
    proc = _python("import sys\n"
                   "from execfeedback.finetune.training_process import use_hf_kernels\n"
                   "from execfeedback.finetune.pipeline import require_train_extra, FinetuneError\n"
                   "use_hf_kernels()\n"
                   "sys.modules['gguf'] = None  # as if it were not installed\n"
                   "try:\n    require_train_extra()\nexcept FinetuneError as e:\n    print(e)\n")
    assert proc.returncode == 0, proc.stderr
    assert "needs the train extra; missing: gguf." in proc.stdout
