"""LoRA fine-tuning on the store's traces: pipeline (one run end to end), train, dpo, data, base, convert, cli.

main(argv) runs `python -m execfeedback finetune ARGV` in a process of its own, where Hugging Face's
`kernels` package owns that name (training_process). Nothing here imports torch or transformers at
import time. May import `export`, `adapters`, `traces` and the leaves.
"""

from .pipeline import main

__all__ = ["main"]
