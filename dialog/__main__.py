"""`python -m dialog backup DEST [--data-dir D]`: a consistent snapshot of the store, safe while Loopbook runs."""

from __future__ import annotations

import argparse
import sys

from .backup import BackupError, backup


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dialog", description="Loopbook store tools.")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("backup", help="copy the store to DEST (a file, or a folder for a timestamped file)")
    b.add_argument("dest", help="file or existing folder to write the backup to")
    b.add_argument("--data-dir", default=None, help="Loopbook's data folder (default: $LOOPBOOK_DATA_DIR or ~/.loopbook)")
    b.add_argument("--overwrite", action="store_true", help="replace DEST if it exists")
    args = parser.parse_args(argv)
    try:
        done = backup(args.dest, args.data_dir, overwrite=args.overwrite)
    except BackupError as e:
        print(f"backup failed: {e}", file=sys.stderr)
        return 1
    print(f"Backed up {done['dialogs']} dialogs, {done['messages']} messages, {done['traces']} traces and "
          f"{done['attempts']} attempts to {done['path']} ({done['bytes'] / 2**20:.1f} MiB).")
    print("To restore: stop Loopbook, then copy that file to DATA_DIR/loopbook.db.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
