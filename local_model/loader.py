"""load_backend: pick and build a backend from a model name, a GGUF path or a remote model."""
from __future__ import annotations

import os

from .protocol import Backend, ModelError
from .registry import resolve

BACKENDS = ("llama", "anthropic", "openai")


def guess_backend(model: str | None, base_url: str | None) -> str:
    if model and str(model).lower().startswith("claude"):
        return "anthropic"
    if base_url:
        return "openai"
    return "llama"


def load_backend(model: str | os.PathLike | None = None, backend: str | None = None, *,
                 base_url: str | None = None, api_key: str | None = None, n_ctx: int = 4096,
                 n_gpu_layers: int | None = None, flash_attn: bool | None = None,
                 lora_path: str | None = None, cache_bytes: int = 2 << 30, verbose: bool = False,
                 n_threads: int | None = None, n_threads_batch: int | None = None,
                 data_dir: str | os.PathLike | None = None, timeout_s: float = 120.0) -> Backend:
    """Build a backend. `model`: a short name ("default", "smollm2-135m", ...), a GGUF path, or a
    remote model name. `backend`: "llama" (in process), "anthropic" or "openai" (any
    OpenAI-compatible base_url); guessed from the model and base_url when left out."""
    kind = (backend or guess_backend(str(model) if model else None, base_url)).lower()
    if kind == "llama":
        from .backends.llama import LlamaBackend

        resolved = resolve(model, data_dir)
        return LlamaBackend(resolved, n_ctx=n_ctx, n_gpu_layers=n_gpu_layers, flash_attn=flash_attn,
                            lora_path=lora_path, cache_bytes=cache_bytes, verbose=verbose,
                            n_threads=n_threads, n_threads_batch=n_threads_batch, data_dir=data_dir)
    if kind == "anthropic":
        from .backends.anthropic import AnthropicBackend

        return AnthropicBackend(model=str(model) if model else None, api_key=api_key, base_url=base_url,
                                timeout_s=timeout_s)
    if kind == "openai":
        from .backends.openai import OpenAIBackend

        if not base_url:
            raise ModelError("the openai backend needs base_url, e.g. http://127.0.0.1:8080/v1")
        return OpenAIBackend(model=str(model) if model and str(model) != "default" else None,
                             base_url=base_url, api_key=api_key, n_ctx=n_ctx, timeout_s=timeout_s)
    raise ModelError(f"unknown backend {backend!r}: use one of {', '.join(BACKENDS)}")
