"""The base model for fine-tuning: the GGUF the app runs, dequantized into transformers and cached.

transformers reads GGUF and dequantizes it, but slowly (about 40 s for SmolLM2-135M on 2 cores,
most of it parsing the vocabulary). The result is saved once per (base sha256, dtype) under
<data_dir>/cache/finetune-base/, with a config.json that names `architectures` and carries no
`quantization_config` (what llama.cpp's converter and peft expect); later runs load it in a second.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from local_model import ModelError, resolve
from local_model.gguf import cached_sha256, read_metadata
from local_model.registry import sha_cache_file

from .data import FinetuneError, is_oom

CACHE_DIR = Path("cache") / "finetune-base"


@dataclass
class Base:
    path: Path
    name: str | None
    sha256: str
    architecture: str
    size_bytes: int

    @property
    def label(self) -> str:
        return self.name or self.path.name


def _processors():
    from transformers.modeling_gguf_pytorch_utils import (GGUF_SUPPORTED_ARCHITECTURES, TENSOR_PROCESSORS,
                                                          Gemma2TensorProcessor, LlamaTensorProcessor,
                                                          NemotronTensorProcessor, TensorProcessor)

    # Processors that leave the linear layers' weights as they are, or permute rows (llama): a LoRA on
    # those layers maps one-to-one onto llama.cpp's tensors. Others fuse, split or reshape them.
    plain = (TensorProcessor, Gemma2TensorProcessor, NemotronTensorProcessor)
    return GGUF_SUPPORTED_ARCHITECTURES, TENSOR_PROCESSORS, TensorProcessor, LlamaTensorProcessor, plain


def trainable_architectures() -> list[str]:
    supported, processors, default, llama, plain = _processors()
    return sorted(a for a in supported if processors.get(a, default) in (*plain, llama) and "moe" not in a)


def check_architecture(arch: str, path: Path | str) -> None:
    """Refuse a base whose architecture transformers cannot load from GGUF (or whose adapter we cannot write)."""
    import transformers

    supported, processors, default, llama, plain = _processors()
    ok = trainable_architectures()
    if arch not in supported:
        raise FinetuneError(
            f"The base model {Path(path).name} has architecture {arch!r}, which transformers "
            f"{transformers.__version__} cannot load from GGUF, so it cannot be fine-tuned here. Architectures that "
            f"work: {', '.join(ok)}. Pick a base of one of these (for example --base qwen2.5-coder-1.5b).")
    if arch not in ok:
        raise FinetuneError(
            f"The base model {Path(path).name} has architecture {arch!r}: transformers can load it, but its GGUF "
            f"tensors are fused or reshaped, so Loopbook cannot write a llama.cpp adapter for it. Architectures that "
            f"work: {', '.join(ok)}.")


def resolve_base(model: str, data_dir: str | os.PathLike | None) -> Base:
    """Resolve the base GGUF as the app does, check its architecture, and hash it (cached)."""
    try:
        resolved = resolve(model, data_dir)
    except ModelError as e:
        raise FinetuneError(f"--base {model}: {e}") from None
    meta = read_metadata(resolved.path)
    arch = str(meta.get("general.architecture") or "")
    if meta.get("general.type") == "adapter":
        raise FinetuneError(f"--base {resolved.path.name} is a LoRA adapter, not a base model.")
    check_architecture(arch, resolved.path)
    sha = cached_sha256(resolved.path, sha_cache_file(data_dir))
    return Base(resolved.path, resolved.name, sha, arch, resolved.path.stat().st_size)


def cache_dir(base: Base, data_dir: str | os.PathLike, dtype_name: str, root: str | os.PathLike | None = None) -> Path:
    folder = Path(root).expanduser() if root else Path(data_dir) / CACHE_DIR
    return folder / f"{base.sha256[:16]}-{dtype_name}"


def write_config(model, directory: Path) -> None:
    """config.json for the dequantized model: architectures named, no quantization_config."""
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["architectures"] = [type(model).__name__]
    (directory / "config.json").write_text(json.dumps(cfg, indent=2, default=str), encoding="utf-8")


def load_base(base: Base, data_dir: str | os.PathLike, *, dtype, use_cache: bool = True,
              cache_root: str | os.PathLike | None = None, quiet: bool = False, log=print):
    """(model, tokenizer, seconds, from_cache): the base in transformers, from the cache when there is one."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype_name = str(dtype).removeprefix("torch.")
    cdir = cache_dir(base, data_dir, dtype_name, cache_root)
    if quiet:
        transformers.utils.logging.disable_progress_bar()
    t0 = time.perf_counter()
    if use_cache and (cdir / "base.json").is_file():
        try:
            model = AutoModelForCausalLM.from_pretrained(cdir, dtype=dtype)
            tok = AutoTokenizer.from_pretrained(cdir)
            return model, tok, time.perf_counter() - t0, True
        except (OSError, ValueError) as e:
            log(f"The cached base in {cdir} is unreadable ({e}); loading from the GGUF again.")
            shutil.rmtree(cdir, ignore_errors=True)
    log(f"Loading {base.path.name} into transformers and dequantizing it (once per base: about 40 s for "
        f"SmolLM2-135M on 2 cores, minutes for a 1.5B model)...")
    # transformers' dequantizing bar is a bare tqdm that no setting turns off; --quiet hides it.
    hush = contextlib.redirect_stderr(io.StringIO()) if quiet else contextlib.nullcontext()
    try:
        with hush:
            tok = AutoTokenizer.from_pretrained(base.path.parent, gguf_file=base.path.name)
            model = AutoModelForCausalLM.from_pretrained(base.path.parent, gguf_file=base.path.name, dtype=dtype)
    except (ValueError, NotImplementedError, KeyError) as e:
        raise FinetuneError(f"transformers could not load {base.path.name} from GGUF ({e}). Pick another base "
                            f"model; architectures that work: {', '.join(trainable_architectures())}.") from None
    except (MemoryError, RuntimeError) as e:
        if not is_oom(e):
            raise
        raise FinetuneError(f"Out of memory while dequantizing {base.path.name} into {dtype_name}. Free memory, use a "
                            "machine with more RAM, or train on a GPU (bf16 needs half the memory).") from None
    model.hf_quantizer = None  # dequantized: nothing quantized is left to save
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.architectures = [type(model).__name__]
    seconds = time.perf_counter() - t0
    if use_cache:
        _save_cache(model, tok, base, cdir, log)
    return model, tok, seconds, False


def _save_cache(model, tok, base: Base, cdir: Path, log) -> None:
    tmp = cdir.with_name(cdir.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        write_config(model, tmp)
        (tmp / "base.json").write_text(json.dumps({"file": base.path.name, "sha256": base.sha256,
                                                   "architecture": base.architecture}, indent=2))
        shutil.rmtree(cdir, ignore_errors=True)
        os.replace(tmp, cdir)
        size = sum(p.stat().st_size for p in cdir.iterdir())
        log(f"Cached the dequantized base in {cdir} ({size / 2**20:.0f} MB; later runs load it in seconds; delete the "
            "folder to reclaim the space, or pass --no-base-cache).")
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        print(f"note: could not cache the dequantized base in {cdir} ({e}); the next run loads the GGUF again.",
              file=sys.stderr)
