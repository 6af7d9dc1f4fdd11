import sqlite3
import threading

import pytest

from dialog import Conflict, InvalidInput, NotFound, Store
from dialog.migrations import MIGRATIONS, migrate


def sources(store, dialog_id):
    return [m["source"] for m in store.messages(dialog_id)]


def test_store_is_wal_and_migrated(store):
    assert store.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    assert (store.data_dir / "loopbook.db").exists()


def test_data_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("LOOPBOOK_DATA_DIR", str(tmp_path / "env-dir"))
    s = Store()
    assert s.path == tmp_path / "env-dir" / "loopbook.db"
    s.close()


def test_dialog_crud(store):
    a = store.create_dialog("  First  ")
    b = store.create_dialog("Second")
    assert a["title"] == "First"
    assert [d["title"] for d in store.list_dialogs()] == ["Second", "First"]
    store.rename_dialog(a["id"], "Renamed")
    assert store.get_dialog(a["id"])["title"] == "Renamed"
    assert [d["title"] for d in store.list_dialogs(search="nam")] == ["Renamed"]
    assert store.list_dialogs(search="%") == []
    store.delete_dialog(b["id"])
    with pytest.raises(NotFound, match="no dialog"):
        store.get_dialog(b["id"])


@pytest.mark.parametrize("title", ["", "   ", None, 5, "x" * 201])
def test_bad_titles(store, title):
    with pytest.raises(InvalidInput):
        store.create_dialog(title)


def test_add_above_below_move_delete(store):
    d = store.create_dialog("d")
    a = store.add_message(d["id"], "code", "a")
    c = store.add_message(d["id"], "code", "c")
    store.add_message(d["id"], "note", "b", after=a["id"])
    store.add_message(d["id"], "prompt", "top", before=a["id"])
    assert sources(store, d["id"]) == ["top", "a", "b", "c"]
    store.move_message(c["id"], before=a["id"])
    assert sources(store, d["id"]) == ["top", "c", "a", "b"]
    store.move_message(c["id"], offset=-1)
    assert sources(store, d["id"]) == ["c", "top", "a", "b"]
    store.move_message(c["id"], offset=+10)
    assert sources(store, d["id"]) == ["top", "a", "b", "c"]
    store.delete_message(a["id"])
    assert sources(store, d["id"]) == ["top", "b", "c"]
    assert [m["position"] for m in store.messages(d["id"])] == [0, 1, 2]


def test_edit_change_type_and_flags(store):
    d = store.create_dialog("d")
    m = store.add_message(d["id"], "code", "x = 1")
    m2 = store.update_message(m["id"], source="x = 2", type="note", pinned=True, skipped=True)
    assert (m2["source"], m2["type"], m2["pinned"], m2["skipped"]) == ("x = 2", "note", True, True)
    assert m2["version"] == m["version"] + 1
    assert m2["updated_at"] >= m["updated_at"]


def test_outputs_roundtrip_as_json(store):
    d = store.create_dialog("d")
    m = store.add_message(d["id"], "code", "print(1)")
    outs = [{"output_type": "stream", "name": "stdout", "text": "1\n"}]
    store.update_message(m["id"], outputs=outs, output_meta={"status": "ok"}, execution_count=3)
    got = store.get_message(m["id"])
    assert got["outputs"] == outs and got["output_meta"] == {"status": "ok"} and got["execution_count"] == 3


def test_version_conflict_tells_the_loser(store):
    d = store.create_dialog("d")
    m = store.add_message(d["id"], "code", "x")
    store.update_message(m["id"], source="tab one", version=m["version"])
    with pytest.raises(Conflict, match="changed elsewhere"):
        store.update_message(m["id"], source="tab two", version=m["version"])
    assert store.get_message(m["id"])["source"] == "tab one"


@pytest.mark.parametrize("fields", [{"type": "markdown"}, {"pinned": "yes"}, {"source": 3},
                                    {"outputs": "text"}, {"colour": "red"}, {"author": "robot"}])
def test_bad_message_fields(store, fields):
    d = store.create_dialog("d")
    m = store.add_message(d["id"], "code", "x")
    with pytest.raises(InvalidInput):
        store.update_message(m["id"], **fields)
    assert store.get_message(m["id"])["source"] == "x"


def test_unknown_ids(store):
    with pytest.raises(NotFound):
        store.get_message(999)
    with pytest.raises(NotFound):
        store.add_message(999, "code", "x")
    with pytest.raises(InvalidInput):
        store.get_dialog("abc")
    d = store.create_dialog("d")
    with pytest.raises(NotFound):
        store.add_message(d["id"], "code", "x", after=12345)
    assert store.messages(d["id"]) == []


def test_anchor_from_other_dialog_is_refused(store):
    d1, d2 = store.create_dialog("1"), store.create_dialog("2")
    m = store.add_message(d1["id"], "code", "x")
    with pytest.raises(InvalidInput, match="another dialog"):
        store.add_message(d2["id"], "code", "y", after=m["id"])


def test_failed_transaction_leaves_nothing(store):
    d = store.create_dialog("d")
    store.add_message(d["id"], "code", "a")
    with pytest.raises(RuntimeError):
        with store.transaction() as c:
            c.execute("UPDATE messages SET source = 'half' WHERE dialog_id = ?", (d["id"],))
            raise RuntimeError("boom")
    assert sources(store, d["id"]) == ["a"]


def test_duplicate_is_a_branch(store):
    d = store.create_dialog("main")
    store.add_message(d["id"], "code", "a", outputs=[{"output_type": "stream", "name": "stdout", "text": "1"}])
    store.add_message(d["id"], "note", "b")
    copy = store.duplicate_dialog(d["id"])
    assert copy["parent_id"] == d["id"] and copy["title"] == "main (copy)"
    assert sources(store, copy["id"]) == ["a", "b"]
    assert store.messages(copy["id"])[0]["outputs"][0]["text"] == "1"
    store.add_message(copy["id"], "code", "only in branch")
    assert sources(store, d["id"]) == ["a", "b"]


def test_delete_dialog_removes_messages(store):
    d = store.create_dialog("d")
    store.add_message(d["id"], "code", "a")
    store.delete_dialog(d["id"])
    assert store.query("SELECT count(*) AS n FROM messages")[0]["n"] == 0


def test_reopen_keeps_everything(tmp_path):
    s = Store(tmp_path)
    d = s.create_dialog("kept")
    s.add_message(d["id"], "code", "print(6*7)", outputs=[{"output_type": "stream", "name": "stdout", "text": "42\n"}])
    s.close()
    s2 = Store(tmp_path)
    assert s2.messages(d["id"])[0]["outputs"][0]["text"] == "42\n"
    s2.close()


def test_newer_schema_is_refused_clearly(tmp_path):
    conn = sqlite3.connect(tmp_path / "x.db", isolation_level=None)
    conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 5}")
    with pytest.raises(RuntimeError, match="newer than this Loopbook"):
        migrate(conn)


def test_failed_migration_rolls_back(tmp_path):
    conn = sqlite3.connect(tmp_path / "x.db", isolation_level=None)

    def bad(c):
        c.execute("CREATE TABLE half (x)")
        raise RuntimeError("midway")

    with pytest.raises(RuntimeError):
        migrate(conn, [MIGRATIONS[0], bad])
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
    assert not conn.execute("SELECT name FROM sqlite_master WHERE name = 'half'").fetchall()


def test_concurrent_writers_lose_nothing(store):
    d = store.create_dialog("d")

    def writer(tag):
        for i in range(50):
            store.add_message(d["id"], "code", f"{tag}{i}")

    threads = [threading.Thread(target=writer, args=(t,)) for t in "abcd"]
    [t.start() for t in threads]
    [t.join() for t in threads]
    msgs = store.messages(d["id"])
    assert len(msgs) == 200
    assert sorted(m["position"] for m in msgs) == list(range(200))


def test_ids_are_never_reused(store):
    # A kernel token names its dialog by id, and traces, edits and the page's undo name cells by id.
    a = store.create_dialog("a")
    b = store.create_dialog("b")
    m = store.add_message(b["id"], "code", "x")
    store.delete_dialog(b["id"])
    c = store.create_dialog("c")
    assert c["id"] > b["id"] > a["id"]
    n = store.add_message(c["id"], "code", "y")
    assert n["id"] > m["id"]
    store.delete_message(n["id"])
    assert store.add_message(c["id"], "code", "z")["id"] > n["id"]


def old_store(path):
    """A store as Loopbook left it before migration 4, with a deleted dialog and cell that other rows still name."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA foreign_keys = ON")
    migrate(conn, MIGRATIONS[:3])
    ts = "2026-01-01T00:00:00.000+00:00"
    for title in ("kept", "parent of a branch", "deleted"):
        conn.execute("INSERT INTO dialogs (title, created_at, updated_at) VALUES (?, ?, ?)", (title, ts, ts))
    conn.execute("UPDATE dialogs SET parent_id = 2 WHERE id = 1")
    for dialog_id, source in ((1, "a"), (1, "b"), (3, "gone with its dialog")):
        conn.execute("INSERT INTO messages (dialog_id, position, type, source, created_at, updated_at) "
                     "VALUES (?, 0, 'code', ?, ?, ?)", (dialog_id, source, ts, ts))
    conn.execute("INSERT INTO traces (kind, dialog_id, message_id, code_message_id, created_at) "
                 "VALUES ('solve', 1, 2, 7, ?)", (ts,))
    conn.execute("INSERT INTO attempts (trace_id, round, dialog_id, message_id, input_hash, exec_status, created_at) "
                 "VALUES (1, 0, 9, 3, 'h', 'ok', ?)", (ts,))
    conn.execute("INSERT INTO edits (dialog_id, message_id, before, after, created_at) VALUES (3, 5, 'x', 'y', ?)", (ts,))
    conn.execute("DELETE FROM dialogs WHERE id = 3")
    conn.close()


def test_an_older_store_migrates_to_ids_that_are_never_reused(tmp_path):
    old_store(tmp_path / "loopbook.db")
    s = Store(tmp_path)
    try:
        assert (s.schema_from, s.schema_version) == (3, len(MIGRATIONS))
        assert [(d["id"], d["title"], d["parent_id"]) for d in sorted(s.list_dialogs(), key=lambda d: d["id"])] == \
            [(1, "kept", 2), (2, "parent of a branch", None)]
        assert [m["source"] for m in s.messages(1)] == ["a", "b"]
        assert s.query("SELECT dialog_id, message_id FROM traces") == [{"dialog_id": 1, "message_id": 2}]
        # New ids start above every id the store still names anywhere (attempts name dialog 9, traces cell 7).
        d = s.create_dialog("new")
        assert d["id"] == 10
        assert s.add_message(d["id"], "code", "c")["id"] == 8
        # The references between tables work as before: a deleted dialog takes its cells, its traces stay.
        s.delete_dialog(1)
        assert s.query("SELECT count(*) AS n FROM messages WHERE dialog_id = 1")[0]["n"] == 0
        assert s.query("SELECT dialog_id FROM traces") == [{"dialog_id": None}]
        assert s.conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        assert s.conn.execute("PRAGMA foreign_key_check").fetchall() == []
        assert s.conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        s.close()
