"""Numbered schema migrations for the Loopbook store; `PRAGMA user_version` records the last applied."""

from __future__ import annotations

import sqlite3


def _script(conn: sqlite3.Connection, sql: str) -> None:
    # executescript() would COMMIT the surrounding transaction first, so run statements one by one.
    for statement in sql.split(";"):
        if statement.strip():
            conn.execute(statement)


def _m1_initial(conn: sqlite3.Connection) -> None:
    _script(
        conn,
        """
        CREATE TABLE dialogs (
            id INTEGER PRIMARY KEY,
            title TEXT NOT NULL,
            settings TEXT NOT NULL DEFAULT '{}',
            parent_id INTEGER,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL
        );
        CREATE TABLE messages (
            id INTEGER PRIMARY KEY,
            dialog_id INTEGER NOT NULL REFERENCES dialogs(id) ON DELETE CASCADE,
            position INTEGER NOT NULL,
            type TEXT NOT NULL CHECK (type IN ('code', 'note', 'prompt')),
            source TEXT NOT NULL DEFAULT '',
            outputs TEXT NOT NULL DEFAULT '[]',
            output_meta TEXT NOT NULL DEFAULT '{}',
            execution_count INTEGER,
            reply TEXT NOT NULL DEFAULT '',
            reply_meta TEXT NOT NULL DEFAULT '{}',
            pinned INTEGER NOT NULL DEFAULT 0,
            skipped INTEGER NOT NULL DEFAULT 0,
            is_test INTEGER NOT NULL DEFAULT 0,
            author TEXT NOT NULL DEFAULT 'human',
            version INTEGER NOT NULL DEFAULT 1,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL
        );
        CREATE INDEX idx_messages_dialog_position ON messages(dialog_id, position);
        """
    )


MIGRATIONS = [_m1_initial]


def migrate(conn: sqlite3.Connection, migrations: list = MIGRATIONS) -> tuple[int, int]:
    """Apply pending migrations, each in its own transaction; return (from_version, to_version)."""
    current = conn.execute("PRAGMA user_version").fetchone()[0]
    if current > len(migrations):
        raise RuntimeError(
            f"This store has schema version {current}, newer than this Loopbook knows ({len(migrations)}). "
            "Update Loopbook, or point --data-dir at another directory."
        )
    start = current
    for number, step in enumerate(migrations[current:], start=current + 1):
        conn.execute("BEGIN IMMEDIATE")
        try:
            step(conn)
            conn.execute(f"PRAGMA user_version = {number}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        current = number
    return start, current
