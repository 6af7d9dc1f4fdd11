"""Solve and Fix through the real server: real SmolLM2, real kernel, traces in the store."""

import json

import pytest


@pytest.fixture
def c(model_server):
    with model_server.client() as client:
        yield client


def dialog_with_test(c, test_source, prompt):
    did = c.post("/api/dialogs", json={"title": "solve"}).json()["id"]
    t = c.post(f"/api/dialogs/{did}/messages", json={"type": "code", "source": test_source}).json()["id"]
    c.patch(f"/api/messages/{t}", json={"is_test": True})
    p = c.post(f"/api/dialogs/{did}/messages", json={"type": "prompt", "source": prompt}).json()["id"]
    return did, p


def test_solve_records_a_complete_trace(c):
    did, p = dialog_with_test(c, "assert add(2, 3) == 5", "Write a Python function add(a, b) that returns a + b.")
    r = c.post(f"/api/messages/{p}/solve", json={"rounds": 2, "max_tokens": 96})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["status"] in ("passed", "failed") and out["attempts"]
    assert out["stop_reason"] in ("passed", "budget", "no_progress", "no_code")
    trace = c.get(f"/api/traces/{out['trace_id']}").json()
    assert trace["dialog_id"] == did and trace["message_id"] == p and trace["n_attempts"] == len(out["attempts"])
    first = trace["attempts"][0]
    assert first["input_messages"][0]["role"] == "system"
    assert "add(a, b)" in first["input_messages"][-1]["content"]
    for a in trace["attempts"]:
        assert a["manifest"]["sha256"] and a["sampling"]["max_tokens"] == 96
        assert a["prompt_tokens"] and a["completion_tokens"] is not None
        assert (a["feedback"] is None) == a["passed"]
    # rounds: each later attempt saw the earlier one's feedback
    for prev, nxt in zip(trace["attempts"], trace["attempts"][1:]):
        assert nxt["input_messages"][-1]["content"] == prev["feedback"]
    if out["code_message_id"]:
        code = c.get(f"/api/messages/{out['code_message_id']}").json()
        assert code["author"] == "model" and code["type"] == "code"
        msgs = [m["id"] for m in c.get(f"/api/dialogs/{did}").json()["messages"]]
        assert msgs.index(out["code_message_id"]) == msgs.index(p) + 1


def test_failing_check_is_fed_back_with_what_it_computed(c):
    # No function can satisfy both: the loop must feed back, then stop (budget or no progress).
    did, p = dialog_with_test(c, "assert f(1) == 2\nassert f(1) == 3", "Write a Python function f(x) returning x + 1.")
    out = c.post(f"/api/messages/{p}/solve", json={"rounds": 1, "max_tokens": 64}).json()
    assert out["status"] == "failed" and out["stop_reason"] in ("budget", "no_progress", "no_code")
    fed = [a["feedback"] for a in out["attempts"] if a["feedback"]]
    assert fed
    checked = [a["feedback"] for a in out["attempts"] if a["exec_status"] == "check_failed" and a["feedback"]]
    # SmolLM2 writes a working f(x) = x + 1 here, so the second check fails on what it computed: the rule
    # below is exercised, not skipped by an empty list.
    assert checked, [(a["exec_status"], a["code"]) for a in out["attempts"]]
    for f in checked:
        assert "`f(1)` returned" in f and "expected 3" in f


def test_fix_starts_from_the_cells_error(c):
    did = c.post("/api/dialogs", json={"title": "fix"}).json()["id"]
    m = c.post(f"/api/dialogs/{did}/messages", json={"type": "code", "source": "print(undefined_thing)"}).json()["id"]
    assert c.post(f"/api/messages/{m}/run").json()["status"] == "error"
    out = c.post(f"/api/messages/{m}/fix", json={"rounds": 1, "max_tokens": 64}).json()
    human = out["attempts"][0]
    assert human["author"] == "human" and human["ename"] == "NameError" and "undefined_thing" in human["feedback"]
    assert all(a["author"] == "model" for a in out["attempts"][1:])
    trace = c.get(f"/api/traces/{out['trace_id']}").json()
    assert trace["kind"] == "fix"
    assert "print(undefined_thing)" in trace["attempts"][1]["input_messages"][-1]["content"]


def test_fix_refuses_a_cell_that_did_not_fail(c):
    did = c.post("/api/dialogs", json={"title": "fix"}).json()["id"]
    m = c.post(f"/api/dialogs/{did}/messages", json={"type": "code", "source": "x = 1"}).json()["id"]
    c.post(f"/api/messages/{m}/run")
    r = c.post(f"/api/messages/{m}/fix", json={})
    assert r.status_code == 400 and "did not fail" in r.json()["error"]


def test_bad_test_cell_and_settings_are_refused(c):
    did, p = dialog_with_test(c, "assert (", "anything")
    r = c.post(f"/api/messages/{p}/solve", json={})
    assert r.status_code == 400 and "does not parse" in r.json()["error"]
    did, p = dialog_with_test(c, "assert True", "anything")
    assert c.post(f"/api/messages/{p}/solve", json={"rounds": -1}).status_code == 400
    assert c.post(f"/api/messages/{p}/solve", json={"bogus": 1}).status_code == 400


def test_solve_streams_over_sse(c):
    did, p = dialog_with_test(c, "assert double(2) == 4", "Write a Python function double(x) returning 2 * x.")
    with c.stream("POST", f"/api/messages/{p}/solve", json={"rounds": 0, "max_tokens": 64},
                  headers={"Accept": "text/event-stream"}) as r:
        text = "".join(r.iter_text())
    kinds = [l[7:] for l in text.splitlines() if l.startswith("event: ")]
    assert "attempt_start" in kinds and "token" in kinds and "attempt" in kinds and kinds[-1] == "done"
    done = json.loads(text.rstrip().splitlines()[-1][6:])
    assert done["summary"]["trace_id"]


def test_human_edit_of_model_code_is_a_correction(c, model_server):
    did, p = dialog_with_test(c, "assert add(1, 1) == 2", "Write a Python function add(a, b) returning a + b.")
    out = c.post(f"/api/messages/{p}/solve", json={"rounds": 0, "max_tokens": 96}).json()
    assert out["code_message_id"], [(a["exec_status"], a["completion"]) for a in out["attempts"]]  # SmolLM2 writes add
    code_id = out["code_message_id"]
    c.patch(f"/api/messages/{code_id}", json={"source": "def add(a, b):\n    return b + a\n"})
    assert c.get(f"/api/messages/{code_id}").json()["author"] == "human_edit"
    import sqlite3
    db = sqlite3.connect(model_server.data_dir / "loopbook.db")
    rows = db.execute("SELECT before, after, trace_id FROM edits WHERE message_id = ?", (code_id,)).fetchall()
    assert rows and rows[0][1].startswith("def add(a, b):\n    return b + a") and rows[0][2] == out["trace_id"]


def test_page_shows_attempts_and_trace(c):
    did, p = dialog_with_test(c, "assert sq(3) == 9", "Write a Python function sq(x) returning x * x.")
    out = c.post(f"/api/messages/{p}/solve", json={"rounds": 0, "max_tokens": 64}).json()
    html = c.get(f"/d/{did}").text
    assert f'id="loop-{p}"' in html and f'href="/traces/{out["trace_id"]}"' in html
    page = c.get(f"/traces/{out['trace_id']}").text
    assert "What the model saw" in page and "What it wrote" in page


def test_dataset_download_after_solving(c):
    import io
    import zipfile

    did, p = dialog_with_test(c, "assert inc(1) == 2", "Write a Python function inc(x) returning x + 1.")
    c.post(f"/api/messages/{p}/solve", json={"rounds": 0, "max_tokens": 64})
    r = c.post("/api/export", params={"format": "all"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
    z = zipfile.ZipFile(io.BytesIO(r.content))
    names = z.namelist()
    assert any(n.endswith("README.md") for n in names) and any(n.startswith("trajectory") or "/trajectory" in n
                                                               for n in names)
    card = z.read(next(n for n in names if n.endswith("README.md"))).decode()
    assert "smollm2" in card.lower()
    bad = c.post("/api/export", data={"format": "nonsense"})
    assert bad.status_code == 400 and bad.json()["error"]
