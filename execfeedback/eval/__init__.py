"""Headless eval: problems (the file format), benchmarks (HumanEval as problems), problem_sets/, runner, and the
commands (cli: eval; benchmarks_cli: problems). May import loop, traces, adapters and the leaves."""
