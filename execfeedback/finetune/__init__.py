"""LoRA fine-tuning on the store's traces: pipeline (one run), train, dpo, data, base, convert, cli. main(argv) runs
`python -m execfeedback finetune ARGV` in a process of its own, where Hugging Face's `kernels` owns that name
(training_process); nothing here imports torch at import time. May import export, adapters, traces and the leaves."""

from .pipeline import main  # noqa: F401 - execfeedback.finetune.main(argv): a run from any process
