"""Completion and help from a dialog's kernel through the JSON API (in process, real kernels)."""

from __future__ import annotations

import threading
import time

import pytest


@pytest.fixture
def c(app_client):
    return app_client


def dialog_with(c, *sources: str) -> int:
    did = c.post("/api/dialogs", json={"title": "introspect"}).json()["id"]
    for src in sources:
        mid = c.post(f"/api/dialogs/{did}/messages", json={"type": "code", "source": src}).json()["id"]
        assert c.post(f"/api/messages/{mid}/run").json()["status"] == "ok"
    return did


def test_complete_a_dict_key_and_a_module_attribute(c):
    did = dialog_with(c, "d = {'alpha': 1}\nimport collections")
    r = c.post(f"/api/dialogs/{did}/complete", json={"code": "d[", "cursor_pos": 2})
    assert r.status_code == 200, r.text
    res = r.json()
    assert res["status"] == "ok" and any("alpha" in m for m in res["matches"])
    res = c.post(f"/api/dialogs/{did}/complete", json={"code": "collections.Ord", "cursor_pos": 15}).json()
    assert "OrderedDict" in res["matches"]
    assert res["cursor_start"] == 12 and res["cursor_end"] == 15
    assert {"text", "type", "start", "end", "signature"} <= set(res["items"][0])


def test_cursor_pos_counts_code_points(c):
    did = dialog_with(c, "import collections")
    code = "s = '😀'; collections.Ord"  # the emoji is one code point (two UTF-16 units in a browser)
    res = c.post(f"/api/dialogs/{did}/complete", json={"code": code, "cursor_pos": len(code)}).json()
    assert "OrderedDict" in res["matches"] and res["cursor_end"] == len(code)


def test_inspect_gives_signature_and_docstring(c):
    did = dialog_with(c, "def area(width: float, height: float = 2.0) -> float:\n    '''The area of a rectangle.'''\n"
                         "    return width * height\n")
    res = c.post(f"/api/dialogs/{did}/inspect", json={"code": "area(", "cursor_pos": 5}).json()
    assert res["status"] == "ok" and res["found"]
    assert "width: float" in res["signature"] and "area of a rectangle" in res["docstring"]
    res = c.post(f"/api/dialogs/{did}/inspect", json={"code": "no_such_name_here", "cursor_pos": 17}).json()
    assert res["status"] == "ok" and not res["found"] and res["message"]


def test_a_dialog_without_a_kernel_gets_one(c):
    did = c.post("/api/dialogs", json={"title": "fresh"}).json()["id"]
    res = c.post(f"/api/dialogs/{did}/complete", json={"code": "import collections\ncollections.Ord"}).json()
    assert res["status"] == "ok" and "OrderedDict" in res["matches"]


def test_busy_kernel_answers_at_once_with_a_note(c):
    did = dialog_with(c, "x = 1")
    mid = c.post(f"/api/dialogs/{did}/messages", json={"type": "code", "source": "import time; time.sleep(2)"}).json()["id"]
    t = threading.Thread(target=lambda: c.post(f"/api/messages/{mid}/run"))
    t.start()
    try:
        deadline = time.monotonic() + 10
        while c.get(f"/api/dialogs/{did}/kernel").json()["state"] != "busy":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        t0 = time.monotonic()
        res = c.post(f"/api/dialogs/{did}/complete", json={"code": "x", "cursor_pos": 1}).json()
        assert time.monotonic() - t0 < 1.0
        assert res["status"] == "busy" and "running a cell" in res["message"]
        assert c.post(f"/api/dialogs/{did}/inspect", json={"code": "x", "cursor_pos": 1}).json()["status"] == "busy"
    finally:
        t.join(30)


@pytest.mark.parametrize("body", [{"code": 3}, {"code": "abc", "cursor_pos": 9}, {"code": "abc", "cursor_pos": -1},
                                  {"code": "abc", "cursor_pos": "1"}, {"code": "abc", "cursor_pos": True}, {}])
def test_bad_requests_are_4xx_with_a_message(c, body):
    did = dialog_with(c)
    for what in ("complete", "inspect"):
        r = c.post(f"/api/dialogs/{did}/{what}", json=body)
        assert r.status_code == 400 and r.json()["error"], (what, body, r.text)
    assert c.post("/api/dialogs/999999/complete", json={"code": ""}).status_code == 404


def test_the_kernel_helpers_token_does_not_reach_completion_help_or_the_meter(c):
    from apphelpers import TOKEN
    from kernels.helper_setup import kernel_token

    d = c.post("/api/dialogs", json={"title": "helper"}).json()
    token = kernel_token(TOKEN, d["id"], c.get(f"/api/dialogs/{d['id']}").json()["created_at"])
    own = {"Authorization": f"token {token}"}
    assert c.get(f"/api/dialogs/{d['id']}", headers=own).status_code == 200  # its own dialog: yes
    for method, path in (("POST", "complete"), ("POST", "inspect"), ("GET", "tokens")):
        r = c.request(method, f"/api/dialogs/{d['id']}/{path}", json={"code": "x"}, headers=own)
        assert r.status_code == 401, (path, r.status_code)
