"""GPU offload figures, side by side in one run: the same model loaded all on the GPU and all on the CPU.

  python bench/bench_gpu.py [--model qwen2.5-coder-1.5b|smollm2-135m|PATH] [--decode-tokens 256]

Loads the model through Loopbook's own backend (local_model.load_backend, which plans the offload
from llama.cpp's support and the free VRAM), prints the plan, then measures on each placement:
1. decode tokens/s (greedy, 256 tokens after a short prompt);
2. prompt tokens/s reading a ~2,000-token prompt (time to first token).
Ratios GPU/CPU come last. Without a CUDA build of llama-cpp-python (or without a GPU) it says so
and measures the CPU alone.
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_model import WORDS, raw_decode  # noqa: E402  (this folder is on sys.path when run as a script)
from local_model import load_backend  # noqa: E402
from local_model.gpu import gpu_offload_supported  # noqa: E402

def decode_rate(llm, n: int) -> float:
    """(n-1) tokens over the time between the first and the n-th generated token (bench_model's measure)."""
    return raw_decode(llm, llm.tokenize(b"Write a long story about a lighthouse keeper. Use many paragraphs.\n"), n)


def prompt_rate(llm, n_tokens: int) -> tuple[float, int]:
    """Prompt tokens/s for a fresh ~n_tokens prompt (no cache), and its length."""
    text = " ".join(WORDS[(i * 7) % len(WORDS)] for i in range(n_tokens))
    tokens = llm.tokenize(text.encode())[:n_tokens]
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(tokens)
    return len(tokens) / (time.perf_counter() - t0), len(tokens)


def measure(model: str, n_gpu_layers: int | None, args) -> dict:
    backend = load_backend(model, backend="llama", n_ctx=args.n_ctx, n_gpu_layers=n_gpu_layers)
    llm = backend.llm
    decode_rate(llm, 16)  # warm-up: CUDA graphs, allocations
    dec = [decode_rate(llm, args.decode_tokens) for _ in range(args.repeats)]
    pre = [prompt_rate(llm, args.prompt_tokens) for _ in range(args.repeats)]
    out = {"plan": backend.manifest["gpu"], "n_gpu_layers": backend.manifest["n_gpu_layers"],
           "decode": statistics.median(dec), "prompt": statistics.median(p for p, _ in pre), "prompt_len": pre[0][1]}
    del llm
    backend.close()
    del backend
    gc.collect()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-coder-1.5b")
    ap.add_argument("--decode-tokens", type=int, default=256)
    ap.add_argument("--prompt-tokens", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--n-ctx", type=int, default=4096)
    args = ap.parse_args()
    import llama_cpp

    supported = gpu_offload_supported()
    print(f"llama-cpp-python {llama_cpp.__version__}; GPU offload supported by this build: {supported}; "
          f"{os.cpu_count()} CPU cores", flush=True)
    rows = []
    if supported:
        gpu = measure(args.model, None, args)  # None: Loopbook's own plan, as the app loads it
        print(f"plan: {gpu['plan']} (n_gpu_layers={gpu['n_gpu_layers']})", flush=True)
        rows.append(("GPU (planned)", gpu))
    cpu = measure(args.model, 0, args)
    rows.append(("CPU only", cpu))
    print(f"\n{'placement':<16}{'decode tok/s':>14}{'prompt tok/s':>14}  (prompt {cpu['prompt_len']} tokens, "
          f"median of {args.repeats})")
    for name, r in rows:
        print(f"{name:<16}{r['decode']:>14.1f}{r['prompt']:>14.1f}")
    if supported:
        print(f"GPU/CPU ratio   {rows[0][1]['decode'] / cpu['decode']:>14.2f}{rows[0][1]['prompt'] / cpu['prompt']:>14.2f}")
    else:
        print("no GPU figures: this llama-cpp-python build has no GPU offload (install it with CUDA: see README)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
