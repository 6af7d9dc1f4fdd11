"""Deciding how many layers go to the GPU, and saying why in one sentence."""
from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

GiB = 1 << 30
# Room kept free for llama.cpp's compute buffers and the CUDA context.
COMPUTE_MARGIN = 768 << 20


@dataclass
class GpuPlan:
    n_gpu_layers: int  # -1 means all layers
    flash_attn: bool
    reason: str
    free_vram_bytes: int | None = None
    device: str | None = None


def gpu_offload_supported() -> bool:
    import llama_cpp

    return bool(llama_cpp.llama_supports_gpu_offload())


def free_vram() -> tuple[int | None, str | None]:
    """Free bytes on the first GPU and its name: nvidia-smi, else torch when it is already imported.

    Never imports torch: its CUDA libraries and llama.cpp's, loaded into one process, crash it
    ("free(): invalid pointer", seen on an H100 with torch cu130 and llama.cpp built on CUDA 13).
    """
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=memory.free,name", "--format=csv,noheader,nounits"],
                capture_output=True, text=True, timeout=10,
            ).stdout.strip().splitlines()
            if out:
                free_mib, name = [s.strip() for s in out[0].split(",", 1)]
                return int(float(free_mib)) << 20, name
        except (OSError, ValueError, subprocess.SubprocessError):
            pass
    torch = sys.modules.get("torch")
    try:
        if torch is not None and torch.cuda.is_available():
            free, _total = torch.cuda.mem_get_info()
            return int(free), torch.cuda.get_device_name()
    except Exception:  # noqa: BLE001 - any failure means "unknown"
        pass
    return None, None


def layer_sizes(meta: dict[str, Any], file_size: int, n_ctx: int) -> tuple[int, int, int]:
    """(block count, weight bytes per offloadable layer, KV bytes per layer at n_ctx) from GGUF metadata."""
    arch = meta.get("general.architecture", "")
    n_layers = int(meta.get(f"{arch}.block_count") or 0) or 32
    n_embd = int(meta.get(f"{arch}.embedding_length") or 0)
    n_head = int(meta.get(f"{arch}.attention.head_count") or 0)
    n_head_kv = int(meta.get(f"{arch}.attention.head_count_kv") or n_head or 0)
    head_dim = int(meta.get(f"{arch}.attention.key_length") or (n_embd // n_head if n_head else 128))
    kv_per_layer = 2 * n_head_kv * head_dim * 2 * n_ctx  # K and V, f16
    per_layer = file_size // (n_layers + 1)  # +1: the output layer offloads too
    return n_layers, per_layer, kv_per_layer


def plan_offload(
    *,
    n_layers: int,
    layer_bytes: int,
    kv_layer_bytes: int = 0,
    n_gpu_layers: int | None = None,
    flash_attn: bool | None = None,
    supported: bool,
    free_bytes: int | None = None,
    device: str | None = None,
) -> GpuPlan:
    """The offload decision; pure, so it can be checked with any VRAM figure."""
    total = n_layers + 1
    if not supported:
        return GpuPlan(0, bool(flash_attn), "CPU (llama.cpp built without GPU offload)")
    where = f"GPU ({device})" if device else "GPU"

    def fa(default: bool) -> bool:
        return default if flash_attn is None else bool(flash_attn)

    if n_gpu_layers is not None:
        if n_gpu_layers == 0:
            return GpuPlan(0, fa(False), "CPU, as asked (n_gpu_layers=0)", free_bytes, device)
        n = total if n_gpu_layers < 0 else min(n_gpu_layers, total)
        return GpuPlan(n_gpu_layers, fa(True), f"{where}: {n} of {total} layers offloaded, as asked"
                       + (", flash attention on" if fa(True) else ""), free_bytes, device)
    if free_bytes is None:
        return GpuPlan(-1, fa(True), f"{where}: all {total} layers offloaded (free VRAM unknown)"
                       + (", flash attention on" if fa(True) else ""), None, device)
    fits = max(0, (free_bytes - COMPUTE_MARGIN) // max(1, layer_bytes + kv_layer_bytes))
    free_txt = f"{free_bytes / GiB:.1f} GiB free"
    if fits >= total:
        return GpuPlan(-1, fa(True), f"{where}: all {total} layers offloaded ({free_txt})"
                       + (", flash attention on" if fa(True) else ""), free_bytes, device)
    if fits == 0:
        return GpuPlan(0, fa(False), f"CPU: the GPU has only {free_txt}, too little for one layer",
                       free_bytes, device)
    need = total * (layer_bytes + kv_layer_bytes) + COMPUTE_MARGIN
    return GpuPlan(int(fits), fa(True), f"{where}: {fits} of {total} layers offloaded, the rest on CPU "
                   f"({free_txt}, the whole model needs about {need / GiB:.1f} GiB)"
                   + (", flash attention on" if fa(True) else ""), free_bytes, device)


def choose(meta: dict[str, Any], file_size: int, n_ctx: int, n_gpu_layers: int | None = None,
           flash_attn: bool | None = None, supported: bool | None = None) -> GpuPlan:
    """Plan for this machine: asks llama.cpp whether it can offload (unless told), then how much VRAM is free."""
    supported = gpu_offload_supported() if supported is None else supported
    n_layers, per_layer, kv_layer = layer_sizes(meta, file_size, n_ctx)
    free, device = (free_vram() if supported and n_gpu_layers is None else (None, None))
    return plan_offload(n_layers=n_layers, layer_bytes=per_layer, kv_layer_bytes=kv_layer,
                        n_gpu_layers=n_gpu_layers, flash_attn=flash_attn, supported=supported,
                        free_bytes=free, device=device)
