"""Headless eval: problem files, standard benchmarks as problem files, the runner and its command.

May import `loop`, `traces`, `adapters` and the leaves (`dialog`, `kernels`, `local_model`).
"""
