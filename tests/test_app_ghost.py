"""Ghost text through the API (POST /api/dialogs/{id}/ghost and /ghost/outcome) on a real server with SmolLM2: the
context sent, the log in the store, outcomes, and clear answers for bad input and for no model."""
from __future__ import annotations

import sqlite3

import pytest


@pytest.fixture
def mc(model_server):
    with model_server.client() as client:
        yield client


def logged(server, completion_id: int) -> dict:
    conn = sqlite3.connect(f"file:{server.data_dir / 'loopbook.db'}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    try:
        return dict(conn.execute("SELECT * FROM completions WHERE id = ?", (completion_id,)).fetchone())
    finally:
        conn.close()


def dialog_with(c, cells) -> tuple[int, list[int]]:
    did = c.post("/api/dialogs", json={"title": "ghost"}).json()["id"]
    ids = [c.post(f"/api/dialogs/{did}/messages", json=cell).json()["id"] for cell in cells]
    return did, ids


def test_a_suggestion_is_made_from_the_cells_above_and_logged_with_its_outcome(mc, model_server):
    did, (code, note, skipped, cell) = dialog_with(mc, [
        {"type": "code", "source": "import math"}, {"type": "note", "source": "The area of a circle."},
        {"type": "code", "source": "secret_left_out = 1"}, {"type": "code", "source": ""}])
    mc.patch(f"/api/messages/{skipped}", json={"skipped": True})
    text = "def area(r):\n    return math.pi * r"
    r = mc.post(f"/api/dialogs/{did}/ghost", json={"message_id": cell, "text": text + "\n", "cursor": len(text)})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["status"] == "ok" and out["figures"]["mode"] == "prefix" and out["figures"]["prompt_tokens"] > 0
    if not out["text"].strip():
        pytest.skip("SmolLM2 suggested only whitespace here; nothing was logged")
    row = logged(model_server, out["id"])
    assert row["prefix"] == "import math\n\n# The area of a circle.\n\n" + text  # the skipped cell is left out
    assert row["suffix"] == "\n" and row["suggestion"] == out["text"] and row["outcome"] is None
    assert row["message_id"] == cell and row["mode"] == "prefix" and row["model"]

    ok = mc.post(f"/api/dialogs/{did}/ghost/outcome", json={"id": out["id"], "outcome": "accepted"})
    assert ok.status_code == 200 and ok.json() == {"id": out["id"], "outcome": "accepted"}
    edited = mc.post(f"/api/dialogs/{did}/ghost/outcome", json={"id": out["id"], "outcome": "edited", "final": "x"})
    assert edited.json()["outcome"] == "edited"
    row = logged(model_server, out["id"])
    assert row["outcome"] == "edited" and row["final"] == "x" and row["decided_at"]
    again = mc.post(f"/api/dialogs/{did}/ghost/outcome", json={"id": out["id"], "outcome": "dropped"})
    assert again.status_code == 400 and "only an accepted one" in again.json()["error"]


def test_a_prompt_cell_gets_ghost_text_too(mc):
    did, (cell,) = dialog_with(mc, [{"type": "prompt", "source": ""}])
    r = mc.post(f"/api/dialogs/{did}/ghost", json={"message_id": cell, "text": "Write a function that"})
    assert r.status_code == 200 and r.json()["status"] == "ok"


@pytest.mark.parametrize("body, message", [
    ({"text": "x"}, "'message_id' must be the id"),
    ({"message_id": "note", "text": "x"}, "ghost text is for code and prompt cells"),
    ({"message_id": "code", "text": 5}, "'text' must be a string"),
    ({"message_id": "code", "text": "ab", "cursor": 3}, "'cursor' must be a whole number from 0"),
    ({"message_id": "code", "text": "ab", "cursor": True}, "'cursor'"),
    ({"message_id": "code", "text": "ab", "max_tokens": 0}, "'max_tokens'"),
])
def test_bad_requests_are_400_with_a_message(mc, body, message):
    did, (code, note) = dialog_with(mc, [{"type": "code", "source": ""}, {"type": "note", "source": "n"}])
    body = {**body, **({"message_id": {"code": code, "note": note}[body["message_id"]]} if "message_id" in body else {})}
    r = mc.post(f"/api/dialogs/{did}/ghost", json=body)
    assert r.status_code == 400 and message in r.json()["error"], r.text


def test_a_dialog_or_cell_that_does_not_exist_is_404(mc):
    did, (cell,) = dialog_with(mc, [{"type": "code", "source": ""}])
    other, _ = dialog_with(mc, [])
    assert mc.post("/api/dialogs/999999/ghost", json={"message_id": cell, "text": ""}).status_code == 404
    assert mc.post(f"/api/dialogs/{did}/ghost", json={"message_id": 999999, "text": ""}).status_code == 404
    r = mc.post(f"/api/dialogs/{other}/ghost", json={"message_id": cell, "text": ""})
    assert r.status_code == 404 and "not in dialog" in r.json()["error"]
    assert mc.post(f"/api/dialogs/{did}/ghost/outcome", json={"id": 999999, "outcome": "dropped"}).status_code == 404
    r = mc.post(f"/api/dialogs/{did}/ghost/outcome", json={"id": 1, "outcome": "maybe"})
    assert r.status_code == 400 and "accepted, edited, dropped" in r.json()["error"]


def test_without_a_model_the_answer_says_so_and_while_loading_it_says_that(c, app_client):
    did, (cell,) = dialog_with(c, [{"type": "code", "source": "x = "}])
    r = c.post(f"/api/dialogs/{did}/ghost", json={"message_id": cell})
    assert r.status_code == 200
    assert r.json()["status"] == "no_model" and "No model is loaded" in r.json()["message"] and r.json()["text"] == ""
    # The in-process app, while its (missing) model counts as loading: a status to show, not an error page.
    models = app_client.app.state.ws.models
    did, (cell,) = dialog_with(app_client, [{"type": "code", "source": "x = "}])
    models.loading = True
    try:
        r = app_client.post(f"/api/dialogs/{did}/ghost", json={"message_id": cell})
    finally:
        models.loading = False
    assert r.status_code == 200 and r.json()["status"] == "loading" and "is loading" in r.json()["message"]


def test_ghost_text_between_two_asks_leaves_the_dialogs_cached_prefix(mc):
    did, (p1,) = dialog_with(mc, [{"type": "prompt", "source": "Say hello."}])
    first = mc.post(f"/api/messages/{p1}/ask", json={}).json()["figures"]
    code = mc.post(f"/api/dialogs/{did}/messages", json={"type": "code", "source": ""}).json()["id"]
    for typed in ("import os\n", "import os\nprint(os.", "import os\nprint(os.getcwd())\nx = "):
        assert mc.post(f"/api/dialogs/{did}/ghost", json={"message_id": code, "text": typed}).json()["status"] == "ok"
    p2 = mc.post(f"/api/dialogs/{did}/messages", json={"type": "prompt", "source": "Say goodbye."}).json()["id"]
    second = mc.post(f"/api/messages/{p2}/ask", json={}).json()["figures"]
    assert second["cached_prompt_tokens"] >= first["prompt_tokens"] - 8
