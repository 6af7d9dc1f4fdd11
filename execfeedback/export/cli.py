"""`python -m execfeedback export`: arguments and the run, with clear messages instead of tracebacks."""

from __future__ import annotations

import argparse
import os

from ..traces import open_store
from .options import add_trace_filters
from .schema import FORMATS

HELP = "export traces as SFT, preference, KTO, trajectory and correction datasets with a dataset card"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", help="Loopbook data directory (default: $LOOPBOOK_DATA_DIR or ~/.loopbook)")
    p.add_argument("--out", required=True, help="directory for <format>.<split>.jsonl and README.md")
    p.add_argument("--force", action="store_true", help="replace an earlier export in a non-empty --out")
    p.add_argument("--format", action="append", metavar="FORMAT",
                   help=f"{', '.join(FORMATS)} or all (default); repeat or separate with commas")
    p.add_argument("--observation-role", choices=["user", "tool"], help="role of observation turns (default user)")
    p.add_argument("--parquet", action="store_true", help="write Parquet instead of JSON Lines (needs pyarrow)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 4),
                   help="processes for large stores (default: one per core, at most 4)")
    f = p.add_argument_group("filters")
    f.add_argument("--outcome", choices=["solved", "unsolved", "all"], help="(default all)")
    add_trace_filters(f)
    f.add_argument("--include-unfinished", action="store_true", help="also traces whose loop never finished")
    h = p.add_argument_group("hygiene")
    h.add_argument("--dedup", choices=["near", "exact", "none"], help="duplicate removal (default near)")
    h.add_argument("--max-observation-chars", type=int, help="cut longer observations in the middle (default "
                   "4000; 0: no limit)")
    h.add_argument("--max-tokens-per-row", type=int, help="cut observations, then drop rows, to fit (needs "
                   "--tokenizer-gguf)")
    h.add_argument("--tokenizer-gguf", metavar="PATH", help="GGUF whose vocabulary counts tokens")
    s = p.add_argument_group("split")
    s.add_argument("--split-by", choices=["task", "dialog"], help="held-out unit (default task)")
    s.add_argument("--test-fraction", type=float, help="share of groups in test (default 0.1)")
    s.add_argument("--seed", type=int, help="split seed (default 0)")
    s.add_argument("--exclude-eval-run", action="append", metavar="NAME",
                   help="keep this eval run's tasks out of train (repeatable)")


_OPTION_KEYS = ("format", "observation_role", "parquet", "outcome", "min_rounds", "max_rounds", "model", "backend",
                "dialog", "eval_run", "since", "until", "author", "include_unfinished", "dedup",
                "max_observation_chars", "max_tokens_per_row", "tokenizer_gguf", "split_by", "test_fraction", "seed",
                "exclude_eval_run")


def run(args: argparse.Namespace) -> int:
    from .exporter import ExportError, export_to_dir, options_from_mapping

    try:
        options = options_from_mapping({k: getattr(args, k) for k in _OPTION_KEYS if getattr(args, k) is not None})
    except ExportError as e:
        raise SystemExit(f"error: {e}") from None
    store = open_store(args.data_dir)
    try:
        report = export_to_dir(store, args.out, options, force=args.force, progress=not args.quiet,
                               workers=args.workers)
    except ExportError as e:
        raise SystemExit(f"error: {e}") from None
    finally:
        store.close()
    print(f"Wrote {len(report.files)} files to {report.directory}:")
    width = max(len(n) for n in report.files)
    for name, n in report.files.items():
        print(f"  {name:<{width}}  {n:>8} rows")
    dropped = sum(e + n for e, n in report.dedup.values())
    print(f"Duplicates dropped: {dropped}; secrets replaced: {sum(report.secrets.values())}; "
          f"observations cut: {report.stats.observations_cut}.")
    print(f"Dataset card: {report.directory / 'README.md'}")
    return 0
