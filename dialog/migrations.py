"""Numbered schema migrations for the Loopbook store; `PRAGMA user_version` records the last applied."""

from __future__ import annotations

import sqlite3

import sqlite_utils

# The schema is SQL (sqlite-utils' create_table cannot say AUTOINCREMENT, CHECK or ON DELETE); each step runs it
# through the store's sqlite_utils.Database inside migrate()'s transaction.


def _script(db: sqlite_utils.Database, sql: str) -> None:
    # Statement by statement, as written: sqlite_master keeps each one's text, so a new store's schema is the very
    # text older versions wrote (db.executescript trims it), and nothing commits the surrounding transaction.
    for statement in sql.split(";"):
        if statement.strip():
            db.execute(statement)


def _m1_initial(db: sqlite_utils.Database) -> None:
    _script(
        db,
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


def _m2_traces(db: sqlite_utils.Database) -> None:
    # One trace is one solve (or fix, or eval problem); one attempt is one model turn and its execution.
    _script(
        db,
        """
        CREATE TABLE eval_runs (
            id INTEGER PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            problems_path TEXT,
            problems_sha256 TEXT,
            config TEXT NOT NULL DEFAULT '{}',
            status TEXT NOT NULL DEFAULT 'running',
            summary TEXT NOT NULL DEFAULT '{}',
            created_at TEXT NOT NULL,
            finished_at TEXT
        );
        CREATE TABLE traces (
            id INTEGER PRIMARY KEY,
            kind TEXT NOT NULL CHECK (kind IN ('solve', 'fix', 'eval')),
            dialog_id INTEGER REFERENCES dialogs(id) ON DELETE SET NULL,
            message_id INTEGER,
            task_id TEXT,
            task_source TEXT,
            eval_run_id INTEGER REFERENCES eval_runs(id) ON DELETE SET NULL,
            status TEXT NOT NULL DEFAULT 'running',
            stop_reason TEXT,
            rounds INTEGER NOT NULL DEFAULT 0,
            n_attempts INTEGER NOT NULL DEFAULT 0,
            final_attempt_id INTEGER,
            code_message_id INTEGER,
            hidden_passed INTEGER,
            model TEXT,
            backend TEXT,
            manifest TEXT NOT NULL DEFAULT '{}',
            sampling TEXT NOT NULL DEFAULT '{}',
            config TEXT NOT NULL DEFAULT '{}',
            created_at TEXT NOT NULL,
            finished_at TEXT
        );
        CREATE INDEX idx_traces_dialog ON traces(dialog_id);
        CREATE INDEX idx_traces_eval_run ON traces(eval_run_id);
        CREATE INDEX idx_traces_task ON traces(task_id);
        CREATE TABLE blobs (
            hash TEXT PRIMARY KEY,
            body TEXT NOT NULL
        );
        CREATE TABLE attempts (
            id INTEGER PRIMARY KEY,
            trace_id INTEGER NOT NULL REFERENCES traces(id) ON DELETE CASCADE,
            round INTEGER NOT NULL,
            candidate INTEGER NOT NULL DEFAULT 0,
            dialog_id INTEGER,
            message_id INTEGER,
            task_id TEXT,
            task_source TEXT,
            input_hash TEXT NOT NULL,
            completion TEXT NOT NULL DEFAULT '',
            finish_reason TEXT,
            code TEXT,
            extracted INTEGER NOT NULL DEFAULT 0,
            extract_reason TEXT,
            exec_status TEXT NOT NULL,
            passed INTEGER NOT NULL DEFAULT 0,
            ename TEXT,
            evalue TEXT,
            traceback TEXT NOT NULL DEFAULT '[]',
            stdout TEXT NOT NULL DEFAULT '',
            stderr TEXT NOT NULL DEFAULT '',
            stdout_chars INTEGER NOT NULL DEFAULT 0,
            stderr_chars INTEGER NOT NULL DEFAULT 0,
            truncated INTEGER NOT NULL DEFAULT 0,
            checks TEXT,
            locals TEXT,
            feedback TEXT,
            hidden_passed INTEGER,
            ttft_s REAL,
            prompt_eval_s REAL,
            decode_s REAL,
            tokens_per_s REAL,
            exec_s REAL,
            prompt_tokens INTEGER,
            cached_prompt_tokens INTEGER,
            completion_tokens INTEGER,
            manifest TEXT NOT NULL DEFAULT '{}',
            sampling TEXT NOT NULL DEFAULT '{}',
            author TEXT NOT NULL DEFAULT 'model',
            created_at TEXT NOT NULL
        );
        CREATE INDEX idx_attempts_trace ON attempts(trace_id, round, candidate);
        CREATE TABLE edits (
            id INTEGER PRIMARY KEY,
            dialog_id INTEGER,
            message_id INTEGER NOT NULL,
            trace_id INTEGER REFERENCES traces(id) ON DELETE SET NULL,
            attempt_id INTEGER,
            before TEXT NOT NULL,
            after TEXT NOT NULL,
            created_at TEXT NOT NULL
        );
        CREATE INDEX idx_edits_message ON edits(message_id)
        """,
    )


def _m3_adapters(db: sqlite_utils.Database) -> None:
    # One row per LoRA adapter trained (or imported) for a base GGUF; the file lives in <data_dir>/adapters/.
    # Rows appear only once the adapter file is complete and loads, so every row names a usable file.
    _script(
        db,
        """
        CREATE TABLE adapters (
            id INTEGER PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            file_name TEXT NOT NULL,
            sha256 TEXT NOT NULL,
            size_bytes INTEGER NOT NULL,
            base_model TEXT,
            base_file TEXT NOT NULL,
            base_sha256 TEXT NOT NULL,
            architecture TEXT NOT NULL,
            method TEXT NOT NULL DEFAULT 'sft',
            source TEXT NOT NULL DEFAULT 'trained',
            export TEXT NOT NULL DEFAULT '{}',
            hyperparameters TEXT NOT NULL DEFAULT '{}',
            training TEXT NOT NULL DEFAULT '{}',
            eval_before TEXT NOT NULL DEFAULT '{}',
            eval_after TEXT NOT NULL DEFAULT '{}',
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL
        );
        CREATE INDEX idx_adapters_base ON adapters(base_sha256)
        """,
    )


_DIALOGS_V4 = """
    CREATE TABLE dialogs_v4 (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        title TEXT NOT NULL,
        settings TEXT NOT NULL DEFAULT '{}',
        parent_id INTEGER,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL
    )"""
_MESSAGES_V4 = """
    CREATE TABLE messages_v4 (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
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
    )"""
# Every place an id of the table may still be named after its row is gone: the next id starts above them all.
_ID_MENTIONS = {
    "dialogs": ["SELECT max(id) FROM dialogs", "SELECT max(parent_id) FROM dialogs", "SELECT max(dialog_id) FROM traces",
                "SELECT max(dialog_id) FROM attempts", "SELECT max(dialog_id) FROM edits"],
    "messages": ["SELECT max(id) FROM messages", "SELECT max(message_id) FROM traces",
                 "SELECT max(code_message_id) FROM traces", "SELECT max(message_id) FROM attempts",
                 "SELECT max(message_id) FROM edits"],
}


def _m4_ids_never_reused(db: sqlite_utils.Database) -> None:
    # Without AUTOINCREMENT, SQLite hands the id of the newest deleted row to the next insert: a deleted dialog's
    # kernel token then opened the new dialog, and traces, edits and the page's undo named the wrong cell. SQLite
    # cannot add AUTOINCREMENT to a table, so both tables are rebuilt (with foreign keys off: see migrate()).
    seeds = {table: max((db.execute(q).fetchone()[0] or 0) for q in queries) for table, queries in _ID_MENTIONS.items()}
    for table, create in (("dialogs", _DIALOGS_V4), ("messages", _MESSAGES_V4)):
        db.execute(create)
        db.execute(f"INSERT INTO {table}_v4 SELECT * FROM {table}")
        db.execute(f"DROP TABLE {table}")
        db.execute(f"ALTER TABLE {table}_v4 RENAME TO {table}")
        db.execute("DELETE FROM sqlite_sequence WHERE name = ?", (table,))
        db.execute("INSERT INTO sqlite_sequence (name, seq) VALUES (?, ?)", (table, seeds[table]))
    db.execute("CREATE INDEX idx_messages_dialog_position ON messages(dialog_id, position)")


# Dropping a table that others reference would, with foreign keys on, run its ON DELETE actions (emptying
# messages, nulling traces.dialog_id). SQLite's documented way to rebuild such a table: foreign keys off
# (which only works outside a transaction), rebuild, check the references, commit, foreign keys back on.
_m4_ids_never_reused.rebuilds_tables = True



def _m5_attempt_selection(db: sqlite_utils.Database) -> None:
    # Issue 15: an attempt says whether static analysis failed it before running, and, when several candidates
    # were sampled in one round, how selection grouped them and why the winner won (JSON). Added columns only.
    db.execute("ALTER TABLE attempts ADD COLUMN static INTEGER")
    db.execute("ALTER TABLE attempts ADD COLUMN selection TEXT")


def _m6_completions(db: sqlite_utils.Database) -> None:
    # Issue 16: the model's ghost text at the cursor is data. Each suggestion keeps the context it was made from
    # (prefix and suffix around the cursor), what was suggested, and what became of it: NULL until the page
    # reports, then accepted, edited (accepted, then changed within seconds) or dropped.
    _script(
        db,
        """
        CREATE TABLE completions (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            dialog_id INTEGER REFERENCES dialogs(id) ON DELETE SET NULL,
            message_id INTEGER REFERENCES messages(id) ON DELETE SET NULL,
            cell_type TEXT,
            model TEXT,
            mode TEXT NOT NULL CHECK (mode IN ('fim', 'prefix')),
            prefix TEXT NOT NULL,
            suffix TEXT NOT NULL DEFAULT '',
            suggestion TEXT NOT NULL,
            outcome TEXT CHECK (outcome IN ('accepted', 'edited', 'dropped')),
            final TEXT,
            figures TEXT NOT NULL DEFAULT '{}',
            created_at TEXT NOT NULL,
            decided_at TEXT
        );
        CREATE INDEX idx_completions_dialog ON completions(dialog_id);
        CREATE INDEX idx_completions_outcome ON completions(outcome)
        """,
    )


def _m7_tool_calls(db: sqlite_utils.Database) -> None:
    # Issue 16: a prompt's tool loop (`&`fn`` in a prompt), one row per model step: the exact input (a blob, by
    # hash; OpenAI tool-call format), what the model said, the calls it made with their results (JSON), its figures.
    _script(
        db,
        """
        CREATE TABLE tool_steps (
            id INTEGER PRIMARY KEY,
            dialog_id INTEGER REFERENCES dialogs(id) ON DELETE SET NULL,
            message_id INTEGER,
            request_id TEXT NOT NULL,
            step INTEGER NOT NULL,
            input_hash TEXT NOT NULL,
            tools TEXT NOT NULL DEFAULT '[]',
            completion TEXT NOT NULL DEFAULT '',
            calls TEXT NOT NULL DEFAULT '[]',
            finish_reason TEXT,
            note TEXT,
            prompt_tokens INTEGER,
            cached_prompt_tokens INTEGER,
            completion_tokens INTEGER,
            model TEXT,
            backend TEXT,
            created_at TEXT NOT NULL
        );
        CREATE INDEX idx_tool_steps_request ON tool_steps(request_id, step);
        CREATE INDEX idx_tool_steps_message ON tool_steps(message_id)
        """,
    )


MIGRATIONS = [_m1_initial, _m2_traces, _m3_adapters, _m4_ids_never_reused, _m5_attempt_selection,
              _m6_completions, _m7_tool_calls]


def _fk_problems(db: sqlite_utils.Database) -> int:
    return len(db.execute("PRAGMA foreign_key_check").fetchall())


def migrate(db: sqlite_utils.Database | sqlite3.Connection, migrations: list = MIGRATIONS) -> tuple[int, int]:
    """Apply pending migrations, each in its own transaction; return (from_version, to_version)."""
    if isinstance(db, sqlite3.Connection):
        db = sqlite_utils.Database(db)
    current = db.execute("PRAGMA user_version").fetchone()[0]
    if current > len(migrations):
        raise RuntimeError(
            f"This store has schema version {current}, newer than this Loopbook knows ({len(migrations)}). "
            "Update Loopbook, or point --data-dir at another directory."
        )
    start = current
    for number, step in enumerate(migrations[current:], start=current + 1):
        rebuild = getattr(step, "rebuilds_tables", False)
        foreign_keys = db.execute("PRAGMA foreign_keys").fetchone()[0]
        if rebuild:
            db.execute("PRAGMA foreign_keys = OFF")
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                before = _fk_problems(db) if rebuild else 0
                step(db)
                if rebuild and _fk_problems(db) > before:
                    raise RuntimeError(f"Migration {number} would break references between tables; nothing was "
                                       "changed. Please report this with the store's schema.")
                db.execute(f"PRAGMA user_version = {number}")
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        finally:
            if rebuild:
                db.execute(f"PRAGMA foreign_keys = {'ON' if foreign_keys else 'OFF'}")
        current = number
    return start, current
