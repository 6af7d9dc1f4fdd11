"""`python -m execfeedback <command>`: one entry in COMMANDS per subcommand.

A subcommand is a module with HELP (one line), add_arguments(parser) and run(args) -> exit code.
run reports bad input with `raise SystemExit("error: ...")`: a message and exit status 1, no traceback.
Only the module of the command being run is imported (the others may pull in kernels or torch).
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS: dict[str, str] = {
    "export": "execfeedback.export.cli",
    "eval": "execfeedback.eval.cli",
    "finetune": "execfeedback.finetune.cli",
    "adapter": "execfeedback.adapters.cli",
    "problems": "execfeedback.eval.benchmarks_cli",
}


def _command_in(argv: list[str]) -> str | None:
    """The subcommand named on the command line (None for a bare `--help`)."""
    first = next((a for a in argv if not a.startswith("-")), None)
    return first if first in COMMANDS else None


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m execfeedback",
                                     description="Loopbook's execution-feedback loop: traces, eval, export.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = _command_in(sys.argv[1:] if argv is None else argv)
    for name, module_name in COMMANDS.items():
        if chosen is not None and name != chosen:
            sub.add_parser(name)  # not parsed this time: its module stays unimported
            continue
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def _skip_pandas_in_sqlite_utils() -> None:
    # sqlite-utils imports pandas when it is installed (0.6 s here, for a column type we never use);
    # hide it only while sqlite-utils loads, so any later `import pandas` works as usual.
    if "sqlite_utils" in sys.modules or "pandas" in sys.modules:
        return
    sys.modules["pandas"] = None  # type: ignore[assignment]
    try:
        importlib.import_module("sqlite_utils")
    except ImportError:
        pass
    finally:
        del sys.modules["pandas"]


def main(argv: list[str] | None = None) -> int:
    _skip_pandas_in_sqlite_utils()
    args = build_parser(argv).parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("Interrupted.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
