"""Prompt cells answered by the real SmolLM2 GGUF through the real server."""

import json
import time

import pytest

from apphelpers import Server
from parts import assert_offload_matches_the_machine


@pytest.fixture
def c(model_server):
    with model_server.client() as client:
        yield client


def prompt(c, text, did=None):
    did = did or c.post("/api/dialogs", json={"title": "ask"}).json()["id"]
    mid = c.post(f"/api/dialogs/{did}/messages", json={"type": "prompt", "source": text}).json()["id"]
    return did, mid


def test_model_status_names_the_model(c):
    st = c.get("/api/model").json()
    assert st["state"] == "ready" and st["model"] == "smollm2-135m"
    assert st["manifest"]["sha256"] and st["gpu"] == st["manifest"]["gpu"]
    # Offloaded where llama.cpp can use a GPU, on the CPU where it cannot: the page shows the truth either way.
    assert_offload_matches_the_machine(st["manifest"]["n_gpu_layers"], st["gpu"])


def test_ask_returns_and_stores_the_reply(c):
    did, mid = prompt(c, "Write a Python function that adds two numbers.")
    r = c.post(f"/api/messages/{mid}/ask", json={"seed": 1})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["reply"] and body["status"] == "done"
    for key in ("ttft_s", "prompt_tokens", "cached_prompt_tokens", "completion_tokens", "tokens_per_s"):
        assert key in body["figures"]
    assert 0 < body["figures"]["completion_tokens"] <= 32
    assert body["manifest"]["backend"] == "llama" and body["manifest"]["file_name"].endswith(".gguf")
    stored = c.get(f"/api/messages/{mid}").json()
    assert stored["reply"] == body["reply"] and stored["reply_meta"]["status"] == "done"


def test_second_turn_reuses_the_cached_prefix(c):
    did, m1 = prompt(c, "Say hello.")
    first = c.post(f"/api/messages/{m1}/ask", json={}).json()["figures"]
    _, m2 = prompt(c, "Say goodbye.", did)
    second = c.post(f"/api/messages/{m2}/ask", json={}).json()["figures"]
    new_tokens = second["prompt_tokens"] - first["prompt_tokens"]
    assert second["cached_prompt_tokens"] >= first["prompt_tokens"] - 8
    assert second["prompt_tokens"] - second["cached_prompt_tokens"] <= new_tokens + 32


def test_ask_streams_sse(c):
    _, mid = prompt(c, "Count to five.")
    with c.stream("POST", f"/api/messages/{mid}/ask", json={}, headers={"Accept": "text/event-stream"}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        text = "".join(r.iter_text())
    events = [block for block in text.split("\n\n") if block.strip()]
    kinds = [next(l[7:] for l in e.splitlines() if l.startswith("event: ")) for e in events]
    assert kinds.count("token") >= 2 and kinds[-1] == "done"
    done = json.loads("\n".join(l[6:] for l in events[-1].splitlines() if l.startswith("data: ")))
    tokens = "".join(json.loads(next(l[6:] for l in e.splitlines() if l.startswith("data: ")))["text"]
                     for e in events[:-1])
    assert done["reply"] == tokens


def test_stop_cancels_within_a_few_tokens(c):
    _, mid = prompt(c, "Write a long story about a robot.")
    with c.stream("POST", f"/api/messages/{mid}/ask", json={"max_tokens": 400},
                  headers={"Accept": "text/event-stream"}) as r:
        seen = 0
        for line in r.iter_lines():
            if line.startswith("event: token"):
                seen += 1
                if seen == 3:
                    assert c.post(f"/api/messages/{mid}/stop").json()["stopped"] is True
                    assert c.post(f"/api/messages/{mid}/stop").json()["stopped"] is False
    meta = c.get(f"/api/messages/{mid}").json()["reply_meta"]
    assert meta["status"] == "cancelled"
    assert meta["figures"]["completion_tokens"] <= 8


@pytest.mark.parametrize("kind,source,status", [("code", "x = 1", 400), ("prompt", "   ", 400)])
def test_ask_refuses_what_it_cannot_answer(c, kind, source, status):
    did = c.post("/api/dialogs", json={"title": "bad"}).json()["id"]
    mid = c.post(f"/api/dialogs/{did}/messages", json={"type": kind, "source": source}).json()["id"]
    r = c.post(f"/api/messages/{mid}/ask", json={})
    assert r.status_code == status and r.json()["error"]


@pytest.mark.parametrize("body", [{"temperature": "hot"}, {"max_tokens": -5}, {"colour": 1}, {"model": 5}])
def test_bad_sampling_is_refused(c, body):
    _, mid = prompt(c, "hi")
    r = c.post(f"/api/messages/{mid}/ask", json=body)
    assert r.status_code == 400, r.text


def test_unknown_model_is_a_clear_error_and_keeps_the_resident_one(c):
    _, mid = prompt(c, "hi")
    r = c.post(f"/api/messages/{mid}/ask", json={"model": "/nowhere/missing.gguf"})
    assert r.status_code == 503 and "missing.gguf" in r.json()["error"]
    assert c.get("/api/model").json()["model"] == "smollm2-135m"


def test_page_streams_the_reply(c):
    _, mid = prompt(c, "Say hi.")
    html = c.post(f"/cells/{mid}/ask", headers={"HX-Request": "true"}).text
    assert f'sse-connect="/cells/{mid}/stream"' in html and 'sse-close="done"' in html
    with c.stream("GET", f"/cells/{mid}/stream") as r:
        text = "".join(r.iter_text())
    assert "event: token" in text and "event: done" in text
    assert f'id="reply-{mid}"' in text.split("event: done")[1]
    assert "TTFT" in text.split("event: done")[1]


def test_code_blocks_become_cells(c):
    did, mid = prompt(c, "x")
    c.patch(f"/api/messages/{mid}", json={"reply": "Here:\n```python\na = 1\n```\nand\n```python\nb = a + 1\n```"})
    r = c.post(f"/cells/{mid}/extract", headers={"HX-Request": "true"})
    assert r.status_code == 200
    msgs = c.get(f"/api/dialogs/{did}").json()["messages"]
    assert [m["source"] for m in msgs] == ["x", "a = 1", "b = a + 1"]
    assert all(m["author"] == "model" for m in msgs[1:])


def test_interrupted_reply_is_marked_after_restart(tmp_path):
    s = Server(tmp_path / "crash", "--model", "smollm2-135m").start()
    with s.client() as c:
        _, mid = prompt(c, "Write a very long essay about the sea.")
        with c.stream("POST", f"/api/messages/{mid}/ask", json={"max_tokens": 2000},
                      headers={"Accept": "text/event-stream"}) as r:
            for line in r.iter_lines():
                if line.startswith("event: token"):
                    time.sleep(1.5)  # past the periodic save
                    s.proc.kill()
                    s.proc.wait()
                    break
    s2 = Server(tmp_path / "crash").start()
    try:
        with s2.client() as c:
            m = c.get(f"/api/messages/{mid}").json()
            assert m["reply_meta"]["status"] == "interrupted"
            assert "incomplete" in c.get(f"/d/{m['dialog_id']}").text
    finally:
        s2.stop()


def test_reply_edited_by_hand_reaches_the_model(c):
    did, mid = prompt(c, "q")
    c.patch(f"/api/messages/{mid}", json={"reply": "model words"})
    form = c.get(f"/cells/{mid}/reply", params={"edit": 1}, headers={"HX-Request": "true"}).text
    assert "reply-source" in form and "model words" in form
    html = c.post(f"/cells/{mid}/reply", data={"reply": "my **own** words", "base": "model words"},
                  headers={"HX-Request": "true"}).text
    assert "<strong>own</strong>" in html
    m = c.get(f"/api/messages/{mid}").json()
    assert m["reply"] == "my **own** words" and m["reply_meta"]["edited_by_hand"]
