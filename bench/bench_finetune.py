"""Fine-tuning figures, one run: GGUF -> transformers load (cold and cached), training speed, conversion.

  python bench/bench_finetune.py [--base smollm2-135m|qwen2.5-coder-1.5b|PATH] [--rows 40] [--steps 6]
                                 [--batch-size 4] [--threads N] [--upstream-sdist llama_cpp_python-0.3.36.tar.gz]

1. Loading the base GGUF into transformers (dequantizing) cold, then from Loopbook's cached copy.
2. LoRA training on synthetic solved traces: seconds per step, steps/s and tokens/s (forward and
   backward of every token, the loss only on assistant turns), and the weighted loss before/after.
3. The adapter: GGUF size, conversion seconds, and the check that llama.cpp loads it.
4. With --upstream-sdist: llama.cpp's own convert_lora_to_gguf.py (from the llama-cpp-python source
   distribution) on the same PEFT adapter, compared tensor by tensor with Loopbook's writer.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from dialog import Store  # noqa: E402
from execfeedback import finetune  # noqa: E402
from execfeedback.adapters import registry as adapters  # noqa: E402
from finetunehelpers import add_solved_traces  # noqa: E402


def upstream_compare(sdist: Path, peft_dir: Path, base_cache: Path, ours: Path, work: Path) -> dict:
    """Run llama.cpp's converter (f32) and compare with our writer's tensors at f32."""
    import gguf
    import numpy as np
    from safetensors.torch import load_file

    from execfeedback.finetune.convert import lora_tensors

    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if "/vendor/llama.cpp/" in m.name and
                   any(k in m.name for k in ("/convert_lora_to_gguf.py", "/conversion/", "/gguf-py/"))]
        tar.extractall(work, members=members, filter="data")
    script = next(work.glob("*/vendor/llama.cpp/convert_lora_to_gguf.py"))
    out = work / "upstream.gguf"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(script), "--base", str(base_cache), "--outtype", "f32", "--outfile",
                           str(out), str(peft_dir)], capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode:
        return {"error": proc.stderr[-800:]}
    config = json.loads((base_cache / "config.json").read_text())
    arch = adapters.read_embedded(ours)["architecture"]
    mine = dict(lora_tensors(load_file(peft_dir / "adapter_model.safetensors"), arch=arch, config=config, dtype="f32"))
    theirs = {t.name: np.array(t.data) for t in gguf.GGUFReader(str(out)).tensors}
    same_names = set(mine) == set(theirs)
    diff = max(float(np.abs(mine[k] - theirs[k].reshape(mine[k].shape)).max()) for k in theirs) if same_names else None
    return {"upstream_s": round(seconds, 2), "tensors": len(theirs), "same_names": same_names,
            "max_abs_diff": diff, "upstream_bytes_f32": out.stat().st_size}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="smollm2-135m")
    ap.add_argument("--rows", type=int, default=40)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--upstream-sdist", type=Path)
    ap.add_argument("--keep", type=Path, help="use this folder (kept) instead of a temporary one")
    a = ap.parse_args()

    work = a.keep or Path(tempfile.mkdtemp(prefix="bench-finetune-"))
    data, cache = work / "data", work / "base-cache"
    store = Store(data)
    if not store.query("SELECT 1 FROM traces LIMIT 1"):
        add_solved_traces(store, a.rows, fix_every=2)
    store.close()
    common = ["--data-dir", str(data), "--base", a.base, "--max-steps", str(a.steps), "--batch-size",
              str(a.batch_size), "--base-cache", str(cache), "--eval-rows", "8", "--save-every", "0", "--quiet",
              "--lr", "1e-3", "--min-rows", "4", *(["--threads", str(a.threads)] if a.threads else [])]
    print(f"machine: {platform.processor() or platform.machine()}, {__import__('os').cpu_count()} CPUs; "
          f"base {a.base}; {a.rows} traces; {a.steps} steps of batch {a.batch_size}")
    runs = {}
    for name in ("cold", "cached"):
        t0 = time.perf_counter()
        rc = finetune.main([*common, "--out", f"bench-{name}", "--replace", *(["--restart"])])
        store = Store(data)
        rec = adapters.get(store, f"bench-{name}") if rc == 0 else None
        store.close()
        runs[name] = (rec, time.perf_counter() - t0)
    cold, cached = runs["cold"][0], runs["cached"][0]
    t = cached["training"]
    print(f"GGUF -> transformers load: cold {cold['training']['load_s']:.1f} s, cached "
          f"{t['load_s']:.2f} s (ratio {cold['training']['load_s'] / max(t['load_s'], 1e-3):.0f}x)")
    print(f"training ({t['device']}, {t['dtype']}): {t['steps']} steps in {t['train_s']:.1f} s = "
          f"{t['steps_per_s']:.3f} steps/s, {t['train_s'] / t['steps']:.2f} s/step, {t['tokens_per_s']:.0f} tokens/s "
          f"({t['train_tokens']} tokens)")
    print(f"weighted loss on training rows: {t['train_loss_before']} -> {t['train_loss_after']}; "
          f"first/last steps {t['loss_first']} -> {t['loss_last']}")
    print(f"adapter: {cached['size_bytes'] / 2**20:.2f} MB (f16, r={cached['hyperparameters']['lora_r']}, all linear "
          f"layers), conversion {t['convert_s']:.2f} s, llama.cpp load check {t.get('verify_s', '-')} s")
    print(f"whole command: cold {runs['cold'][1]:.0f} s, cached {runs['cached'][1]:.0f} s")
    if a.upstream_sdist:
        peft_dir = data / "finetune" / "bench-cached" / "peft"
        base_cache = next(cache.iterdir())
        r = upstream_compare(a.upstream_sdist, peft_dir, base_cache, Path(cached["path"]), work / "upstream")
        print(f"llama.cpp convert_lora_to_gguf.py vs Loopbook's writer: {json.dumps(r)}")
    if not a.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
