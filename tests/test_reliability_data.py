"""Losing nothing: a server killed mid-Solve, two writers on one cell, backups while writes go on."""

import contextlib
import json
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from apphelpers import ROOT, Server, wait_for_model
from execfeedback.traces import EXEC_STATUSES


def add(c, did, type, source):
    r = c.post(f"/api/dialogs/{did}/messages", json={"type": type, "source": source})
    assert r.status_code == 200, r.text
    return r.json()["id"]


def pid_gone(pid, timeout=20.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            os.kill(pid, 0)
            status = Path(f"/proc/{pid}/status").read_text()
            if "zombie" in status.lower():
                return True
        except (ProcessLookupError, FileNotFoundError):
            return True
        time.sleep(0.1)
    return False


def ask_quietly(s, message_id):
    try:
        httpx.post(f"{s.base}/api/messages/{message_id}/ask", json={}, headers=s.headers, timeout=60)
    except httpx.HTTPError:
        pass  # the server is killed under it, on purpose


def test_sigkill_in_the_middle_of_a_solve_loses_nothing_committed(tmp_path):
    s = Server(tmp_path / "crash", "--model", "smollm2-135m", "--max-tokens", "48", "--exec-timeout", "10").start()
    killed = False
    try:
        with s.client() as c:
            wait_for_model(c)
            did = c.post("/api/dialogs", json={"title": "crash mid-solve"}).json()["id"]
            add(c, did, "note", "# Kept through the crash")
            ran = add(c, did, "code", "x = 6 * 7\nprint(x)")
            assert c.post(f"/api/messages/{ran}/run").json()["status"] == "ok"
            test_cell = add(c, did, "code", "assert f(1) == 2\nassert f(1) == 3")  # no f can pass both
            c.patch(f"/api/messages/{test_cell}", json={"is_test": True})
            solve = add(c, did, "prompt", "Write a Python function f(x) that returns x + 1.")
            ask = add(c, did, "prompt", "Say hello in one short sentence.")
            before = c.get(f"/api/dialogs/{did}").json()["messages"]
            kernel_pid = c.get(f"/api/dialogs/{did}/kernel").json()["info"]["pid"]

            seen_attempts, depth = [], []
            with c.stream("POST", f"/api/messages/{solve}/solve", json={"rounds": 5, "max_tokens": 48},
                          headers={"Accept": "text/event-stream"}) as r:
                assert r.status_code == 200
                event = None
                asking = None
                for line in r.iter_lines():
                    if line.startswith("event: "):
                        event = line[7:]
                    elif line.startswith("data: ") and event == "attempt":
                        seen_attempts.append(json.loads(line[6:])["attempt"]["id"])
                        # A reply asked for now waits its turn behind the loop's next generation.
                        asking = threading.Thread(target=ask_quietly, args=(s, ask), daemon=True)
                        asking.start()
                        for _ in range(100):
                            if c.get(f"/api/messages/{ask}").json()["reply_meta"].get("status") == "streaming":
                                break
                            time.sleep(0.05)
                    elif line.startswith("data: ") and event == "token" and seen_attempts:
                        # Round 1 is generating now, with the ask queued behind it: kill the server here.
                        depth.append(c.get("/api/model").json()["queue_depth"])
                        s.proc.send_signal(signal.SIGKILL)
                        s.proc.wait()
                        killed = True
                        break
            assert killed and seen_attempts
            assert depth[0] >= 1  # the queued ask was visible as queue depth
    finally:
        if not killed:
            s.stop()
    # The kernel notices its parent is gone and exits on its own: no orphans after a crash.
    assert pid_gone(kernel_pid)

    db = tmp_path / "crash" / "loopbook.db"
    s2 = Server(tmp_path / "crash", "--model", "/no/model/needed.gguf").start()
    try:
        with s2.client() as c:
            after = c.get(f"/api/dialogs/{did}").json()["messages"]
            # Every committed cell is there as it was (no half-landed code cell); the asked prompt is marked.
            assert [m["id"] for m in after] == [m["id"] for m in before]
            for old, new in zip(before, after):
                if new["id"] == ask:
                    assert new["reply_meta"]["status"] == "interrupted"
                    continue
                assert new == old
            assert "incomplete" in c.get(f"/d/{did}").text
            traces = c.get(f"/api/messages/{solve}/traces").json()
            assert len(traces) == 1 and traces[0]["status"] == "interrupted"
            trace = c.get(f"/api/traces/{traces[0]['id']}").json()
            attempts = trace["attempts"]
            assert trace["n_attempts"] == len(attempts) >= 1
            assert set(seen_attempts) <= {a["id"] for a in attempts}  # every attempt the client saw is kept
            for a in attempts:  # each one whole: written in one transaction, or not at all
                assert a["exec_status"] in EXEC_STATUSES and isinstance(a["completion"], str)
                assert a["input_messages"] and a["input_messages"][0]["role"] == "system"
                assert a["manifest"]["sha256"] and a["sampling"]["max_tokens"] == 48 and a["created_at"]
                assert a["passed"] is False and a["feedback"]
    finally:
        s2.stop()
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
    finally:
        conn.close()


# -- two writers on one cell -------------------------------------------------------------------------------

def test_two_api_clients_race_on_one_cell_and_every_loser_is_told(server, c):
    did = c.post("/api/dialogs", json={"title": "race"}).json()["id"]
    mid = add(c, did, "code", "start")
    v0 = c.get(f"/api/messages/{mid}").json()["version"]
    wins, losses, errors = [], [], []

    def writer(name):
        with server.client() as mine:
            for n in range(15):
                current = mine.get(f"/api/messages/{mid}").json()
                r = mine.patch(f"/api/messages/{mid}", json={"source": f"{name} {n}", "version": current["version"]})
                if r.status_code == 200:
                    wins.append((r.json()["version"], f"{name} {n}"))
                elif r.status_code == 409:
                    losses.append(r.json()["error"])
                else:
                    errors.append(r.text)

    threads = [threading.Thread(target=writer, args=(f"client{i}",)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all("changed elsewhere" in e for e in losses)
    final = c.get(f"/api/messages/{mid}").json()
    versions = sorted(v for v, _ in wins)
    assert versions == list(range(v0 + 1, v0 + 1 + len(wins)))  # each acknowledged write bumped it once
    assert final["version"] == v0 + len(wins) and final["source"] == max(wins)[1]  # the last winner's text


def test_a_losing_edit_records_no_correction(server, c):
    did = c.post("/api/dialogs", json={"title": "model code"}).json()["id"]
    prompt = add(c, did, "prompt", "x")
    c.patch(f"/api/messages/{prompt}", json={"reply": "```python\ndef f():\n    return 1\n```"})
    c.post(f"/cells/{prompt}/extract", headers={"HX-Request": "true"})
    code = c.get(f"/api/dialogs/{did}").json()["messages"][-1]
    assert code["author"] == "model"
    stale = code["version"]
    assert c.patch(f"/api/messages/{code['id']}", json={"source": "def f():\n    return 2", "version": stale}).status_code == 200
    r = c.patch(f"/api/messages/{code['id']}", json={"source": "def f():\n    return 3", "version": stale})
    assert r.status_code == 409
    db = sqlite3.connect(server.data_dir / "loopbook.db")
    try:
        edits = db.execute("SELECT after FROM edits WHERE message_id = ?", (code["id"],)).fetchall()
    finally:
        db.close()
    assert edits == [("def f():\n    return 2",)]  # the winner's correction only


def put(c, mid, source, base, tab):
    return c.put(f"/cells/{mid}", data={"source": source, "base": base},
                 headers={"HX-Request": "true", "X-Loopbook-Tab": tab})


def told(r) -> bool:
    return r.headers.get("hx-retarget") == "#toast" and "changed elsewhere" in r.text


def test_two_tabs_autosaving_one_cell(server, c):
    did = c.post("/api/dialogs", json={"title": "tabs"}).json()["id"]
    mid = add(c, did, "code", "v0")
    source = lambda: c.get(f"/api/messages/{mid}").json()["source"]
    assert not told(put(c, mid, "a1", "v0", "tabA")) and source() == "a1"
    # Tab B still shows v0: its save is refused, and it is told; tab A's text stays.
    r = put(c, mid, "b1", "v0", "tabB")
    assert r.status_code == 200 and told(r) and source() == "a1"
    # Tab A's own saves may overtake each other (its base lags behind its own last save): no conflict.
    assert not told(put(c, mid, "a2", "a1", "tabA"))
    assert not told(put(c, mid, "a3", "a1", "tabA")) and source() == "a3"
    # Someone else (the API, the kernel helper, a Fix) writes: tab A's next save is refused too.
    c.patch(f"/api/messages/{mid}", json={"source": "from the api"})
    assert told(put(c, mid, "a4", "a3", "tabA")) and source() == "from the api"
    # Saving the text the cell already has is never a conflict; a reloaded tab saves again.
    assert not told(put(c, mid, "from the api", "a3", "tabB"))
    assert not told(put(c, mid, "b2", "from the api", "tabB")) and source() == "b2"
    # The same through the save-and-render route.
    r = c.post(f"/cells/{mid}/save", data={"source": "c1", "base": "v0"}, headers={"HX-Request": "true"})
    assert told(r) and source() == "b2"
    # What a browser's textarea does to CR LF and a leading newline is not a conflict.
    c.patch(f"/api/messages/{mid}", json={"source": "\nline 1\r\nline 2"})
    assert not told(put(c, mid, "line 1\nline 2\n", "line 1\nline 2", "tabC"))


# -- backups -----------------------------------------------------------------------------------------------

WRITER = """
import sys, time
sys.path.insert(0, {root!r})
from dialog import Store
s = Store({data!r})
d = s.create_dialog("0")
n = 0
while n < 100000 and not __import__("os").path.exists({stop!r}):
    with s.transaction():  # two cells and the title, always together
        s.add_message(d["id"], "code", f"cell {{n}}")
        s.add_message(d["id"], "note", f"note {{n}}")
        n += 1
        s.rename_dialog(d["id"], str(n))
print(n, flush=True)
"""


def committed(db: Path) -> int:
    """How many of the writer's transactions are committed (its dialog's title), read beside it; 0 before the first."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as conn:
            row = conn.execute("SELECT title FROM dialogs").fetchone()
    except sqlite3.Error:
        return 0  # the store is not there yet, or has no table yet
    return int(row[0]) if row else 0


def committed_past(db: Path, n: int, writer: subprocess.Popen, timeout: float = 60.0) -> int:
    """Wait until the writer has committed more than n transactions; returns how many it has."""
    deadline = time.monotonic() + timeout
    while (now := committed(db)) <= n:
        assert writer.poll() is None, f"the writer stopped after {now} transactions"
        assert time.monotonic() < deadline, f"the writer committed nothing past {n} in {timeout} s"
        time.sleep(0.02)
    return now


def test_backup_is_a_consistent_snapshot_while_writes_go_on(tmp_path):
    data, out = tmp_path / "data", tmp_path / "backups"
    data.mkdir()
    out.mkdir()
    stop = tmp_path / "stop"
    writer = subprocess.Popen([sys.executable, "-c", WRITER.format(root=str(ROOT), data=str(data), stop=str(stop))],
                              stdout=subprocess.PIPE, text=True)
    db = data / "loopbook.db"
    try:
        made, last = [], 0
        for _ in range(3):
            # Each backup starts after the writer committed past what the last backup held (the first, once it
            # has committed anything): every snapshot has more than the one before, and was taken mid-write.
            committed_past(db, last, writer)
            done = subprocess.run([sys.executable, "-m", "dialog", "backup", str(out), "--data-dir", str(data)],
                                  cwd=ROOT, capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, done.stderr
            assert "Backed up" in done.stdout
            made.append(Path(done.stdout.split(" to ")[1].split(" (")[0]))
            last = committed(made[-1])
        committed_past(db, last, writer)  # the writer went on after the last backup too
    finally:
        stop.touch()
        written = int(writer.communicate(timeout=60)[0])
    counts = []
    for path in made:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert not Path(str(path) + "-wal").exists()  # one self-contained file
        conn = sqlite3.connect(path)
        try:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
            title = conn.execute("SELECT title FROM dialogs").fetchone()[0]
            n = conn.execute("SELECT count(*) FROM messages").fetchone()[0]
        finally:
            conn.close()
        assert n == 2 * int(title)  # never a transaction half copied
        counts.append(int(title))
    assert counts == sorted(set(counts)) and max(counts) < written  # the writer really went on meanwhile
    assert not list(out.glob(".*partial*"))


def test_backup_refuses_what_it_cannot_do(tmp_path, store):
    from dialog.backup import BackupError, backup

    store.create_dialog("x")
    with pytest.raises(BackupError, match="no Loopbook store"):
        backup(tmp_path / "b.db", tmp_path / "nowhere")
    first = backup(tmp_path / "b.db", store.data_dir)
    assert first["dialogs"] == 1 and Path(first["path"]).exists()
    with pytest.raises(BackupError, match="exists already"):
        backup(tmp_path / "b.db", store.data_dir)
    assert backup(tmp_path / "b.db", store.data_dir, overwrite=True)["dialogs"] == 1
    with pytest.raises(BackupError, match="must not go over the store"):
        backup(store.data_dir / "loopbook.db", store.data_dir, overwrite=True)
    with pytest.raises(BackupError, match="does not exist"):
        backup(tmp_path / "no" / "such" / "dir" / "b.db", store.data_dir)
