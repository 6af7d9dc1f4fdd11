"""The execution-feedback loop: extract code from a reply, run it, check it, feed the failure back.

Modules: loop (the loop itself), extract, checks, feedback. May import `traces` and the leaves
(`dialog`, `kernels`, `local_model`).
"""
