"""The dialog store: dialogs and their messages in one SQLite file (WAL), with one writer path."""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import sqlite_utils

from .migrations import migrate

MESSAGE_TYPES = ("code", "note", "prompt")
AUTHORS = ("human", "model", "human_edit")
DB_NAME = "loopbook.db"
MAX_TITLE = 200
JSON_FIELDS = ("outputs", "output_meta", "reply_meta")
BOOL_FIELDS = ("pinned", "skipped", "is_test")
EDITABLE = ("source", "type", "pinned", "skipped", "is_test", "outputs", "output_meta",
            "execution_count", "reply", "reply_meta", "author")


class StoreError(Exception):
    """Base for errors the API turns into clean 4xx answers."""

    status = 400


class NotFound(StoreError, LookupError):
    status = 404


class InvalidInput(StoreError, ValueError):
    status = 400


class Conflict(StoreError):
    status = 409


def default_data_dir(override: str | os.PathLike | None = None) -> Path:
    """`override`, else $LOOPBOOK_DATA_DIR, else ~/.loopbook (local_model.registry.data_dir says the same: dialog
    and local_model may not import each other)."""
    return Path(override or os.environ.get("LOOPBOOK_DATA_DIR") or Path.home() / ".loopbook").expanduser()


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _check_type(type_: Any) -> str:
    if type_ not in MESSAGE_TYPES:
        raise InvalidInput(f"Message type must be one of {', '.join(MESSAGE_TYPES)}; got {type_!r}.")
    return type_


def _check_title(title: Any) -> str:
    if not isinstance(title, str) or not title.strip():
        raise InvalidInput("A dialog title must be a non-empty string.")
    title = title.strip()
    if len(title) > MAX_TITLE:
        raise InvalidInput(f"A dialog title may be at most {MAX_TITLE} characters; this one has {len(title)}.")
    return title


def lone_surrogate(data: Any) -> str | None:
    """The first lone surrogate in a JSON-shaped value, or None. JSON may escape one ("\\ud800"), and SQLite
    cannot store it: whatever takes JSON in refuses it up front."""
    todo = [data]
    while todo:
        value = todo.pop()
        if isinstance(value, dict):
            todo.extend(value.keys())
            todo.extend(value.values())
        elif isinstance(value, list):
            todo.extend(value)
        elif isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                return value[e.start]
    return None


def _check_id(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise InvalidInput(f"{what} id must be an integer; got {value!r}.")
    try:
        number = int(value)
    except ValueError:
        raise InvalidInput(f"{what} id must be an integer; got {value!r}.") from None
    if not -2**63 <= number < 2**63:  # SQLite's INTEGER range; beyond it sqlite3 raises OverflowError
        raise InvalidInput(f"{what} id {number} is out of range.")
    return number


class Store:
    """All reads and writes of one Loopbook data directory go through one of these.

    `db` is a sqlite_utils.Database over the store's one writer connection: rows go in through `table.insert`
    and `.update` and come out through `rows_where`. SQL through `db.execute` stays where one statement says it
    better than a row at a time (shifting positions, JSON patches, joins, aggregates, INSERT ... SELECT) and for
    the writes of every cell run, edit and streamed reply (a message and its dialog's updated_at): table.update
    first reads the row and the table's schema again, about 0.1 ms more per write.
    """

    def __init__(self, data_dir: str | os.PathLike | None = None):
        self.data_dir = default_data_dir(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.data_dir / DB_NAME
        # Our own connection under sqlite-utils (its own waits 5 s, not 30, on a busy store and serves one thread):
        # isolation_level=None, because we issue BEGIN/COMMIT ourselves so a multi-row change is one transaction.
        self.conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self.db = sqlite_utils.Database(self.conn)
        self.db.enable_wal()
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self._lock = threading.RLock()
        self._depth = threading.local()
        with self._lock:
            self.schema_from, self.schema_version = migrate(self.db)

    def close(self) -> None:
        with self._lock:
            self.db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite_utils.Database]:
        """One writer at a time; nested calls join the outer transaction. Not db.atomic(), whose BEGIN is
        deferred: a writer takes the write lock up front, so it never fails halfway on a busy store."""
        with self._lock:
            depth = getattr(self._depth, "n", 0)
            if depth:
                self._depth.n = depth + 1
                try:
                    yield self.db
                finally:
                    self._depth.n = depth
                return
            self.db.execute("BEGIN IMMEDIATE")
            self._depth.n = 1
            try:
                yield self.db
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            else:
                self.db.execute("COMMIT")
            finally:
                self._depth.n = 0

    def reader(self) -> sqlite3.Connection:
        """A separate read-only connection: WAL lets it stream while the writer goes on."""
        conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        return conn

    def query(self, sql: str, params: tuple | dict = ()) -> list[dict]:
        with self._lock:
            return list(self.db.query(sql, params))

    def rows(self, table: str, where: str | None = None, args: tuple | list = (), **kw: Any) -> list[dict]:
        """`db[table].rows_where(where, args, order_by=..., select=...)` as a list, read under the writer's lock."""
        with self._lock:
            return list(self.db[table].rows_where(where, args, **kw))

    def recover_interrupted(self) -> int:
        """After a crash: replies that were streaming are marked interrupted (their text so far is kept)."""
        with self.transaction() as db:
            n = db.execute("UPDATE messages SET reply_meta = json_set(reply_meta, '$.status', 'interrupted') "
                           "WHERE json_extract(reply_meta, '$.status') = 'streaming'").rowcount
            if db["traces"].exists():
                db.execute("UPDATE traces SET status = 'interrupted', stop_reason = 'stopped' WHERE status = 'running'")
            return n

    # -- dialogs -------------------------------------------------------------------------------

    def create_dialog(self, title: str, settings: dict | None = None, parent_id: int | None = None) -> dict:
        title = _check_title(title)
        ts = now()
        with self.transaction() as db:
            row = {"title": title, "settings": json.dumps(settings or {}), "parent_id": parent_id,
                   "created_at": ts, "updated_at": ts}
            return self.get_dialog(db["dialogs"].insert(row).last_rowid)

    def list_dialogs(self, search: str | None = None) -> list[dict]:
        sql = (
            "SELECT d.*, (SELECT count(*) FROM messages m WHERE m.dialog_id = d.id) AS n_messages "
            "FROM dialogs d"
        )
        params: tuple = ()
        if search:
            sql += " WHERE d.title LIKE ? ESCAPE '\\'"
            escaped = search.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            params = (f"%{escaped}%",)
        sql += " ORDER BY d.updated_at DESC, d.id DESC"
        return [self._dialog_row(r) for r in self.query(sql, params)]

    def _by_id(self, table: str, what: str, value: Any) -> dict:
        number = _check_id(value, what)
        rows = self.rows(table, "id = ?", (number,))
        if not rows:
            raise NotFound(f"There is no {what.lower()} {number}.")
        return rows[0]

    def get_dialog(self, dialog_id: Any) -> dict:
        return self._dialog_row(self._by_id("dialogs", "Dialog", dialog_id))

    def rename_dialog(self, dialog_id: Any, title: str) -> dict:
        title = _check_title(title)
        with self.transaction() as db:
            d = self.get_dialog(dialog_id)
            db["dialogs"].update(d["id"], {"title": title, "updated_at": now()})
            return self.get_dialog(d["id"])

    def update_dialog_settings(self, dialog_id: Any, **settings: Any) -> dict:
        with self.transaction() as db:
            d = self.get_dialog(dialog_id)
            merged = {**d["settings"], **settings}
            merged = {k: v for k, v in merged.items() if v is not None}
            db["dialogs"].update(d["id"], {"settings": json.dumps(merged), "updated_at": now()})
            return self.get_dialog(d["id"])

    def delete_dialog(self, dialog_id: Any) -> None:
        with self.transaction() as db:
            d = self.get_dialog(dialog_id)
            db["messages"].delete_where("dialog_id = ?", (d["id"],))
            db["dialogs"].delete(d["id"])

    def duplicate_dialog(self, dialog_id: Any, title: str | None = None) -> dict:
        """Branch a dialog: a new dialog with copies of every message, outputs included."""
        with self.transaction() as db:
            d = self.get_dialog(dialog_id)
            new = self.create_dialog(title or f"{d['title']} (copy)", d["settings"], parent_id=d["id"])
            ts = now()
            db.execute(  # the copy never leaves SQLite: one INSERT ... SELECT
                "INSERT INTO messages (dialog_id, position, type, source, outputs, output_meta, execution_count,"
                " reply, reply_meta, pinned, skipped, is_test, author, version, created_at, updated_at)"
                " SELECT ?, position, type, source, outputs, output_meta, execution_count, reply, reply_meta,"
                " pinned, skipped, is_test, author, 1, ?, ? FROM messages WHERE dialog_id = ? ORDER BY position",
                (new["id"], ts, ts, d["id"]),
            )
            return new

    def _touch(self, dialog_id: int) -> None:
        self.db.execute("UPDATE dialogs SET updated_at = ? WHERE id = ?", (now(), dialog_id))

    @staticmethod
    def _dialog_row(row: dict) -> dict:
        row = dict(row)
        row["settings"] = json.loads(row.get("settings") or "{}")
        return row

    # -- messages ------------------------------------------------------------------------------

    def messages(self, dialog_id: Any) -> list[dict]:
        d = self.get_dialog(dialog_id)
        return [self._message_row(r) for r in self.rows("messages", "dialog_id = ?", (d["id"],), order_by="position")]

    def get_message(self, message_id: Any) -> dict:
        return self._message_row(self._by_id("messages", "Message", message_id))

    def add_message(self, dialog_id: Any, type: str = "code", source: str = "", *, after: Any = None,
                    before: Any = None, **fields: Any) -> dict:
        """Insert a message after or before another one (default: at the end of the dialog)."""
        _check_type(type)
        if not isinstance(source, str):
            raise InvalidInput("A message source must be a string.")
        if after is not None and before is not None:
            raise InvalidInput("Give either 'after' or 'before', not both.")
        values = self._clean_fields(fields)
        with self.transaction() as db:
            d = self.get_dialog(dialog_id)
            position = self._insert_position(d["id"], after=after, before=before)
            db.execute("UPDATE messages SET position = position + 1 WHERE dialog_id = ? AND position >= ?",
                       (d["id"], position))
            ts = now()
            row = {"dialog_id": d["id"], "position": position, "type": type, "source": source,
                   "created_at": ts, "updated_at": ts, **values}
            new_id = db["messages"].insert(row).last_rowid
            self._touch(d["id"])
            return self.get_message(new_id)

    def _insert_position(self, dialog_id: int, *, after: Any, before: Any) -> int:
        anchor = after if after is not None else before
        if anchor is None:
            last = self.db.execute("SELECT max(position) FROM messages WHERE dialog_id = ?", (dialog_id,)).fetchone()[0]
            return 0 if last is None else last + 1
        ref = self.get_message(anchor)
        if ref["dialog_id"] != dialog_id:
            raise InvalidInput(f"Message {ref['id']} belongs to another dialog.")
        return ref["position"] + 1 if after is not None else ref["position"]

    def update_message(self, message_id: Any, *, version: Any = None, **fields: Any) -> dict:
        """Change fields of a message; with `version`, refuse (Conflict) if someone else wrote first."""
        values = self._clean_fields(fields)
        with self.transaction() as db:
            m = self.get_message(message_id)
            if version is not None and _check_id(version, "Version") != m["version"]:
                raise Conflict(
                    f"Message {m['id']} was changed elsewhere (you had version {version}, the store has "
                    f"{m['version']}). Reload it to see the other change."
                )
            if not values:
                return m
            values["updated_at"] = now()
            sets = ", ".join(f"{k} = ?" for k in values)
            db.execute(f"UPDATE messages SET {sets}, version = version + 1 WHERE id = ?", (*values.values(), m["id"]))
            self._touch(m["dialog_id"])
            return self.get_message(m["id"])

    def delete_message(self, message_id: Any) -> dict:
        with self.transaction() as db:
            m = self.get_message(message_id)
            db["messages"].delete(m["id"])
            db.execute("UPDATE messages SET position = position - 1 WHERE dialog_id = ? AND position > ?",
                       (m["dialog_id"], m["position"]))
            self._touch(m["dialog_id"])
            return m

    def move_message(self, message_id: Any, *, after: Any = None, before: Any = None,
                     offset: int | None = None) -> dict:
        """Move a message after/before another one, or by `offset` places (-1 is up)."""
        with self.transaction() as db:
            m = self.get_message(message_id)
            ids = [r["id"] for r in self.rows("messages", "dialog_id = ?", (m["dialog_id"],), select="id",
                                              order_by="position")]
            ids.remove(m["id"])
            if offset is not None:
                if isinstance(offset, bool) or not isinstance(offset, int):
                    raise InvalidInput(f"'offset' must be a whole number of places (-1 is up); got {offset!r}.")
                index = max(0, min(len(ids), m["position"] + offset))
            else:
                anchor = after if after is not None else before
                if anchor is None:
                    raise InvalidInput("Say where to move the message: 'after', 'before' or 'offset'.")
                ref = self.get_message(anchor)
                if ref["id"] not in ids:
                    raise InvalidInput(f"Message {ref['id']} is not another message of the same dialog.")
                index = ids.index(ref["id"]) + (1 if after is not None else 0)
            ids.insert(index, m["id"])
            # Every position of the dialog in one statement: each id gets its index in the new order.
            db.execute("UPDATE messages SET position = j.key FROM json_each(?) AS j WHERE messages.id = j.value",
                       (json.dumps(ids),))
            self._touch(m["dialog_id"])
            return self.get_message(m["id"])

    @staticmethod
    def _clean_fields(fields: dict) -> dict:
        unknown = set(fields) - set(EDITABLE)
        if unknown:
            raise InvalidInput(f"Unknown message field(s): {', '.join(sorted(unknown))}.")
        out: dict[str, Any] = {}
        for key, value in fields.items():
            if key == "type":
                value = _check_type(value)
            elif key in ("source", "reply"):
                if not isinstance(value, str):
                    raise InvalidInput(f"'{key}' must be a string.")
            elif key in BOOL_FIELDS:
                if not isinstance(value, (bool, int)) or value not in (0, 1):
                    raise InvalidInput(f"'{key}' must be true or false.")
                value = int(bool(value))
            elif key == "outputs":
                if not isinstance(value, list):
                    raise InvalidInput("'outputs' must be a list of nbformat outputs.")
                value = json.dumps(value)
            elif key in JSON_FIELDS:
                if not isinstance(value, dict):
                    raise InvalidInput(f"'{key}' must be an object.")
                value = json.dumps(value)
            elif key == "author" and value not in AUTHORS:
                raise InvalidInput(f"'author' must be one of {', '.join(AUTHORS)}.")
            elif key == "execution_count" and value is not None and not isinstance(value, int):
                raise InvalidInput("'execution_count' must be an integer or null.")
            out[key] = value
        return out

    @staticmethod
    def _message_row(row: dict) -> dict:
        row = dict(row)
        for key in JSON_FIELDS:
            row[key] = json.loads(row.get(key) or ("[]" if key == "outputs" else "{}"))
        for key in BOOL_FIELDS:
            row[key] = bool(row[key])
        return row
