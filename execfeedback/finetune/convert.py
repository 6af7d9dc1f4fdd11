"""A trained PEFT LoRA as a GGUF adapter that llama.cpp loads (`Llama(model_path=base, lora_path=file)`).

Written with the `gguf` package, inverting exactly what transformers did when it loaded the base
from GGUF: the same tensor name map (gguf's TensorNameMap for the base's architecture) and, for the
llama family, the row permutation of the q and k projections, which transformers undoes on load
and llama.cpp's own converter redoes on the way back (it permutes lora_b, whose rows are W's rows).
bench/bench_finetune.py checks the result tensor by tensor against llama.cpp's convert_lora_to_gguf.py.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..adapters.gguf_file import write_gguf
from .data import FinetuneError

DTYPES = ("f16", "f32")
_PREFIX = "base_model.model."


def _arch_enum(arch: str):
    import gguf

    for key, value in gguf.MODEL_ARCH_NAMES.items():
        if value == arch:
            return key
    raise FinetuneError(f"The gguf package {gguf.__version__ if hasattr(gguf, '__version__') else ''} does not know "
                        f"architecture {arch!r}; upgrade it (pip install -U gguf).")


def _permute(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf LlamaModel.permute (the inverse of transformers' reverse permute)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _needs_permute(arch: str) -> bool:
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, LlamaTensorProcessor

    return TENSOR_PROCESSORS.get(arch) is LlamaTensorProcessor


def lora_tensors(state: dict[str, Any], *, arch: str, config: dict, dtype: str = "f16") -> list[tuple[str, np.ndarray]]:
    """(GGUF name, array) pairs from a PEFT state dict (get_peft_model_state_dict) for the base's architecture."""
    import gguf

    if dtype not in DTYPES:
        raise FinetuneError(f"adapter dtype must be one of {', '.join(DTYPES)}")
    name_map = gguf.get_tensor_name_map(_arch_enum(arch), int(config["num_hidden_layers"]))
    modules: dict[str, dict[str, np.ndarray]] = {}
    for key, tensor in state.items():
        name = key.removeprefix(_PREFIX)
        for part in ("A", "B"):
            suffix = f".lora_{part}.weight"
            if name.endswith(suffix):
                modules.setdefault(name[: -len(suffix)], {})[part] = tensor.detach().float().cpu().numpy()
                break
        else:
            raise FinetuneError(f"The adapter holds {key!r}, which is not a LoRA A or B matrix (modules_to_save and "
                                "trained embeddings cannot be written as a llama.cpp adapter).")
    permute = _needs_permute(arch)
    n_head, n_kv = config.get("num_attention_heads"), config.get("num_key_value_heads")
    np_dtype = np.float16 if dtype == "f16" else np.float32
    out = []
    for module, ab in sorted(modules.items()):
        if set(ab) != {"A", "B"}:
            raise FinetuneError(f"The adapter's {module} lacks its LoRA {'A' if 'A' not in ab else 'B'} matrix.")
        target = name_map.get_name(module)
        if target is None:
            raise FinetuneError(f"{module} has no llama.cpp tensor for architecture {arch}; train with the default "
                                "target modules (the attention and MLP projections).")
        a, b = ab["A"], ab["B"]
        if permute and target.endswith(".attn_q"):
            b = _permute(b, n_head, n_head)
        elif permute and target.endswith(".attn_k"):
            b = _permute(b, n_head, n_kv)
        out.append((f"{target}.weight.lora_a", np.ascontiguousarray(a, dtype=np_dtype)))
        out.append((f"{target}.weight.lora_b", np.ascontiguousarray(b, dtype=np_dtype)))
    if not out:
        raise FinetuneError("The adapter has no LoRA matrices to write.")
    return out


def convert(state: dict[str, Any], *, arch: str, config: dict, alpha: float, out: str | Path, name: str,
            dtype: str = "f16", strings: dict[str, str] | None = None) -> dict:
    """PEFT state dict -> GGUF adapter file; returns figures (seconds, bytes, tensors)."""
    t0 = time.perf_counter()
    tensors = lora_tensors(state, arch=arch, config=config, dtype=dtype)
    size = write_gguf(out, arch=arch, alpha=alpha, tensors=tensors, name=name, strings=strings)
    return {"convert_s": round(time.perf_counter() - t0, 3), "size_bytes": size, "tensors": len(tensors),
            "dtype": dtype}


_VERIFY = """
import sys
from local_model.backends.llama import new_llama
llm = new_llama(model_path=sys.argv[1], lora_path=sys.argv[2], n_ctx=64, n_batch=64, verbose=True)
llm.eval(llm.tokenize(b"def add(a, b):", add_bos=False))
print("adapter-ok", flush=True)
"""


def verify_loads(base_path: str | Path, adapter_path: str | Path, timeout_s: float = 300) -> float:
    """Load the base with the adapter in llama.cpp and run a few tokens through it; returns seconds.

    In a child process: llama-cpp-python 0.3.36 only logs an adapter whose shapes do not fit the base
    ("maybe wrong base model?") and the first evaluation then crashes the process.
    """
    import subprocess

    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-c", _VERIFY, str(base_path), str(adapter_path)], capture_output=True,
                              text=True, timeout=timeout_s, cwd=Path(__file__).resolve().parents[2])
    except subprocess.TimeoutExpired:
        raise FinetuneError(f"llama.cpp took over {timeout_s:.0f} s to load the adapter onto "
                            f"{Path(base_path).name}; nothing was registered.") from None
    if proc.returncode != 0 or "adapter-ok" not in proc.stdout:
        said = [ln.strip() for ln in proc.stderr.splitlines()
                if any(w in ln.lower() for w in ("fail", "incorrect", "error", "invalid"))]
        how = f"exit status {proc.returncode}" if proc.returncode >= 0 else f"killed by signal {-proc.returncode}"
        raise FinetuneError(f"llama.cpp did not load the converted adapter onto {Path(base_path).name} ({how}"
                            + (f": {said[-1]}" if said else "") + "); nothing was registered.")
    return time.perf_counter() - t0

