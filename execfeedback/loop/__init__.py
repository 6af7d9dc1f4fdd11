"""The execution-feedback loop: loop (propose, run, check, select, feed back), extract, checks, feedback, static.
May import traces and the leaves (dialog, kernels, local_model)."""
