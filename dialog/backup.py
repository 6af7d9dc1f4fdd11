"""Consistent snapshots of a Loopbook store through SQLite's online backup API, safe while Loopbook writes."""

from __future__ import annotations

import os
import sqlite3
from datetime import datetime, timezone
from pathlib import Path

import sqlite_utils

from .store import DB_NAME, default_data_dir


class BackupError(Exception):
    """A backup could not be made; the message says why and what to do."""


def backup(dest: str | os.PathLike, data_dir: str | os.PathLike | None = None, *, overwrite: bool = False) -> dict:
    """Copy DATA_DIR/loopbook.db to `dest` (a file, or a folder that gets a timestamped file).

    The copy is taken in one step under one read transaction, so it is a consistent snapshot of the
    store even while a running Loopbook writes to it; the result is a single self-contained file
    (journal mode DELETE), checked with PRAGMA integrity_check, readable by you alone, and written
    under a temporary name first, so a failed backup never leaves a half-written file at `dest`.
    Returns {"path", "bytes", "dialogs", "messages", "traces", "attempts"}.
    """
    source = default_data_dir(data_dir) / DB_NAME
    if not source.is_file():
        raise BackupError(f"There is no Loopbook store at {source}; pass --data-dir (the folder that holds "
                          f"{DB_NAME}).")
    dest = Path(dest).expanduser()
    target = dest / f"loopbook-{datetime.now(timezone.utc):%Y%m%d-%H%M%S-%f}.db" if dest.is_dir() else dest
    if target.exists() and not overwrite:
        raise BackupError(f"{target} exists already; choose another name or pass --overwrite.")
    if target.resolve() == source.resolve() or target.resolve().parent == source.resolve().parent \
            and target.name.startswith(DB_NAME):
        raise BackupError("The backup must not go over the store itself or its WAL files; pick another path.")
    if not target.parent.is_dir():
        raise BackupError(f"The folder {target.parent} does not exist; create it first.")
    partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
    os.close(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))
    try:
        src = sqlite3.connect(source, timeout=60)
        try:
            # SQLite's online backup API, which sqlite-utils does not wrap: pages=-1 copies every page in one step,
            # so writers never interleave with the copy.
            dst = sqlite_utils.Database(partial)
            try:
                src.backup(dst.conn)
                dst.disable_wal()
                check = dst.execute("PRAGMA integrity_check").fetchone()[0]
                if check != "ok":
                    raise BackupError(f"The copy failed its integrity check ({check}); the store itself may be "
                                      "damaged: run `sqlite3 loopbook.db 'PRAGMA integrity_check'`.")
                tables = dst.table_names()  # an older schema may lack some
                counts = {t: dst[t].count if t in tables else None
                          for t in ("dialogs", "messages", "traces", "attempts")}
            finally:
                dst.close()
        finally:
            src.close()
        with open(partial, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(partial, target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return {"path": str(target), "bytes": target.stat().st_size, **counts}
