"""`python -m execfeedback finetune --base qwen2.5-coder-1.5b --out coder-fix-v1`: this process is the training
process: run() binds Hugging Face's `kernels` before anything imports transformers (training_process), then runs
the pipeline."""

from __future__ import annotations

import argparse
import sys

from ..adapters.registry import AdapterError
from ..export.options import add_trace_filters
from . import pipeline
from .data import MIN_ROWS, FinetuneError, FinetuneInterrupted
from .training_process import TrainingProcessError, use_hf_kernels

HELP = "fine-tune a LoRA adapter for the local GGUF model on the store's traces and register it"
EXIT_INTERRUPTED = 130


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--data-dir", help="Loopbook data directory (default: $LOOPBOOK_DATA_DIR or ~/.loopbook)")
    p.add_argument("--out", required=True, metavar="NAME", help="adapter name (registered in the store)")
    p.add_argument("--base", default="default", help="base model: a short name or a GGUF path (default: the app's "
                   "default model)")
    p.add_argument("--replace", action="store_true", help="overwrite a registered adapter of the same name")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    d = p.add_argument_group("data (default: export the store's solved traces into the run folder)")
    d.add_argument("--export", metavar="DIR", help="train on this export (sft.train.jsonl, preference.train.jsonl)")
    add_trace_filters(d)
    d.add_argument("--exclude-eval-run", action="append", metavar="NAME",
                   help="keep this eval run's tasks out of training (repeatable)")
    d.add_argument("--split-by", choices=["task", "dialog"], help="held-out unit (default task)")
    d.add_argument("--test-fraction", type=float, help="share of tasks held out (default 0.1)")
    d.add_argument("--min-rows", type=int, default=MIN_ROWS, help=f"refuse fewer training rows (default {MIN_ROWS})")
    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=int, default=2)
    t.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (overrides --epochs)")
    t.add_argument("--lr", type=float, default=2e-4, help="learning rate (default 2e-4)")
    t.add_argument("--batch-size", type=int, default=4, help="rows per forward pass (default 4)")
    t.add_argument("--grad-accum", type=int, default=1, help="forward passes per optimizer step (default 1)")
    t.add_argument("--max-length", type=int, default=2048, help="tokens per row; longer rows are left out (2048)")
    t.add_argument("--lora-r", type=int, default=16)
    t.add_argument("--lora-alpha", type=int, default=32)
    t.add_argument("--lora-dropout", type=float, default=0.05)
    t.add_argument("--fix-weight", type=float, default=2.0,
                   help="loss weight of an answer that passed after feedback (round-0 passes weigh 1; default 2)")
    t.add_argument("--failed-weight", type=float, default=0.0,
                   help="loss weight of the failed answers before the fix (default 0: context only)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--keep", choices=["best", "last"], default="best",
                   help="best: the epoch with the lowest held-out loss (default); last: the final weights")
    t.add_argument("--dpo", action="store_true", help="after SFT, DPO on the preference pairs (TRL)")
    t.add_argument("--dpo-beta", type=float, default=0.1)
    t.add_argument("--dpo-lr", type=float, default=2e-5)
    t.add_argument("--dpo-epochs", type=int, default=1)
    t.add_argument("--dpo-max-steps", type=int)
    r = p.add_argument_group("machine and run")
    r.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: the GPU in bf16 when there is one, else the CPU in float32")
    g = r.add_mutually_exclusive_group()
    g.add_argument("--gradient-checkpointing", dest="gradient_checkpointing", action="store_true", default=None,
                   help="recompute activations (less memory; default on a GPU)")
    g.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false")
    r.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice, one per core)")
    r.add_argument("--save-every", type=int, default=20, help="checkpoint every N steps (default 20)")
    r.add_argument("--eval-rows", type=int, default=64,
                   help="training rows whose loss is measured before and after (default 64)")
    s = r.add_mutually_exclusive_group()
    s.add_argument("--resume", action="store_true", help="require a checkpoint to resume (default: resume when "
                   "the run folder has one)")
    s.add_argument("--restart", action="store_true", help="discard the run folder's checkpoint and export")
    r.add_argument("--no-base-cache", action="store_true", help="do not keep the dequantized base on disk")
    r.add_argument("--base-cache", metavar="DIR", help="where the dequantized base is kept (default "
                   "DATA_DIR/cache/finetune-base; share one between data directories)")
    r.add_argument("--adapter-dtype", choices=["f16", "f32"], default="f16", help="GGUF tensor type (default f16)")
    r.add_argument("--no-verify", action="store_true", help="skip loading the adapter in llama.cpp before registering")
    return p


def run(args: argparse.Namespace) -> int:
    """The CLI's entry: this process is the training process (see training_process)."""
    try:
        use_hf_kernels()
        return pipeline.finetune(args)
    except FinetuneInterrupted as e:
        print(f"{e}", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except (FinetuneError, AdapterError, TrainingProcessError) as e:
        raise SystemExit(f"error: {e}") from None
