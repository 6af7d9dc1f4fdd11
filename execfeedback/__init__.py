"""The execution-feedback loop: propose, run, check, feed back; traces, eval, export and fine-tuning."""
