"""ipynb, .py and .md export and import through the app (in process)."""

import json

import nbformat
import pytest


@pytest.fixture
def c(app_client):
    return app_client


def make_dialog(c):
    did = c.post("/api/dialogs", json={"title": "Round trip"}).json()["id"]
    c.post(f"/api/dialogs/{did}/messages", json={"type": "note", "source": "# Notes"})
    mid = c.post(f"/api/dialogs/{did}/messages", json={"type": "code", "source": "print('hi')"}).json()["id"]
    c.post(f"/api/messages/{mid}/run")
    p = c.post(f"/api/dialogs/{did}/messages", json={"type": "prompt", "source": "why?"}).json()["id"]
    c.patch(f"/api/messages/{p}", json={"reply": "Because.", "pinned": True})
    return did


def test_export_validates_and_imports_back(c):
    did = make_dialog(c)
    r = c.get(f"/api/dialogs/{did}/export", params={"format": "ipynb"})
    assert r.status_code == 200 and "attachment" in r.headers["content-disposition"]
    nb = nbformat.reads(r.text, as_version=4)
    nbformat.validate(nb)
    assert nb.cells[1].outputs[0]["text"] == "hi\n"
    r2 = c.post("/api/dialogs/import", content=r.content, params={"title": "Back again"})
    assert r2.status_code == 200, r2.text
    new = c.get(f"/api/dialogs/{r2.json()['id']}").json()
    assert new["title"] == "Back again"
    assert [(m["type"], m["source"]) for m in new["messages"]] == [("note", "# Notes"), ("code", "print('hi')"),
                                                                    ("prompt", "why?")]
    assert new["messages"][2]["reply"] == "Because." and new["messages"][2]["pinned"]
    assert new["messages"][1]["outputs"][0]["text"] == "hi\n"


def test_py_and_md_exports(c):
    did = make_dialog(c)
    py = c.get(f"/d/{did}/export.py").text
    assert "# %%" in py and "print('hi')" in py
    md = c.get(f"/d/{did}/export.md").text
    assert "```python\nprint('hi')\n```" in md and "Because." in md


def test_bad_notebooks_are_refused_and_leave_nothing(c):
    before = len(c.get("/api/dialogs").json())
    for body in (b'{"cells": [', b"not json at all", json.dumps({"hello": "world"}).encode(), b""):
        r = c.post("/api/dialogs/import", content=body)
        assert r.status_code == 400 and r.json()["error"], body
    assert len(c.get("/api/dialogs").json()) == before


def test_unknown_export_format(c):
    did = make_dialog(c)
    r = c.get(f"/api/dialogs/{did}/export", params={"format": "docx"})
    assert r.status_code == 400


def test_upload_form_imports(c):
    did = make_dialog(c)
    data = c.get(f"/d/{did}/export.ipynb").content
    r = c.post("/dialogs/import", files={"file": ("uploaded.ipynb", data, "application/json")},
               follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].startswith("/d/")
    new_id = r.headers["location"].rsplit("/", 1)[1]
    assert c.get(f"/api/dialogs/{new_id}").json()["title"] == "uploaded"
