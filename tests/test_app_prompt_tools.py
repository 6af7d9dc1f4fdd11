"""`$`name`` and `&`fn`` through the real server (SmolLM2, the dialog's real kernel): the API's events, the stored
reply, the page's reply area and its live stream, and the dialog's tool_steps and tool_choice settings."""

import json

import pytest

SETUP = '''
import pandas as pd
df = pd.DataFrame({"city": ["Oslo", "Lima"], "temp_c": [4.5, 19.0]})

def scale(n: int) -> int:
    """Multiply n by ten."""
    return n * 10
'''


@pytest.fixture
def c(model_server):
    with model_server.client() as client:
        yield client


def dialog_with_kernel(c, settings=None) -> int:
    did = c.post("/api/dialogs", json={"title": "tools"}).json()["id"]
    if settings:
        assert c.patch(f"/api/dialogs/{did}", json={"settings": settings}).status_code == 200
    code = c.post(f"/api/dialogs/{did}/messages", json={"type": "code", "source": SETUP}).json()["id"]
    assert c.post(f"/api/messages/{code}/run").json()["status"] == "ok"
    return did


def prompt(c, did, text) -> int:
    return c.post(f"/api/dialogs/{did}/messages", json={"type": "prompt", "source": text}).json()["id"]


def sse(text: str) -> list[tuple[str, str]]:
    out = []
    for block in text.split("\n\n"):
        lines = block.splitlines()
        kind = next((ln[7:] for ln in lines if ln.startswith("event: ")), None)
        if kind:
            out.append((kind, "\n".join(ln[6:] for ln in lines if ln.startswith("data: "))))
    return out


def test_the_api_streams_tool_events_and_the_page_shows_the_calls(c):
    did = dialog_with_kernel(c, {"tool_choice": "required"})
    mid = prompt(c, did, "Is $`df` warm? Call &`scale` on a temperature.")
    with c.stream("POST", f"/api/messages/{mid}/ask", json={}, headers={"Accept": "text/event-stream"}) as r:
        assert r.status_code == 200
        events = sse("".join(r.iter_text()))
    kinds = [k for k, _ in events]
    assert "tool" in kinds and kinds[-1] == "done", [e for e in events if e[0] != "token"]
    tool = json.loads(next(d for k, d in events if k == "tool"))
    n = json.loads(tool["arguments"])["n"]
    assert tool["name"] == "scale" and tool["status"] == "ok" and tool["result"] == str(n * 10)
    assert tool["result_type"] == "int" and "type" not in tool
    assert tool["label"] == f"scale(n={n})"
    done = json.loads(events[-1][1])
    assert done["status"] == "done" and done["tools"]["steps"][0]["calls"][0]["id"] == tool["id"]
    assert kinds.index("tool") < len(kinds) - 1  # live, before the answer finished

    stored = c.get(f"/api/messages/{mid}").json()
    assert stored["reply_meta"]["refs"]["values"][0]["status"] == "ok"
    assert "Lima" in stored["reply_meta"]["refs"]["values"][0]["text"]
    html = c.get(f"/cells/{mid}/reply").text
    assert 'class="tool-steps"' in html and f"scale(n={n})" in html and f">{n * 10}</pre>" in html
    # The live stream, replayed after the end, shows the call among the tokens.
    live = c.get(f"/cells/{mid}/stream").text
    assert f"→ scale(n={n}): ok: {n * 10}" in live


def test_unknown_names_are_noted_in_the_reply_and_tool_steps_zero_runs_nothing(c):
    did = dialog_with_kernel(c, {"tool_steps": 0, "tool_choice": "required"})
    mid = prompt(c, did, "Compare $`nosuch` with &`scale`.")
    body = c.post(f"/api/messages/{mid}/ask", json={}).json()
    assert body["status"] == "done"
    assert any("$`nosuch`" in n and "not defined" in n for n in body["notes"])
    assert [x["status"] for s in body["tools"]["steps"] for x in s["calls"]] == ["not_run"]
    html = c.get(f"/cells/{mid}/reply").text
    assert "not defined in the kernel" in html and "tool_steps" in html and "not_run" in html
    # A bad setting value is refused where it is set, saying what is allowed.
    r = c.patch(f"/api/dialogs/{did}", json={"settings": {"tool_choice": "always"}})
    assert r.status_code == 400 and "auto, required" in r.text
    r = c.post(f"/api/messages/{mid}/ask", json={"tool_choice": "sometimes"})
    assert r.status_code == 400 and "tool_choice" in r.text


def test_the_settings_panel_sets_tool_steps_and_tool_choice(c):
    did = c.post("/api/dialogs", json={"title": "tool settings"}).json()["id"]
    page = c.get(f"/d/{did}").text
    assert "Tool steps" in page and 'name="tool_steps"' in page and 'placeholder="default 5"' in page
    assert "Tool choice" in page and '<option value="required">required</option>' in page
    r = c.post(f"/d/{did}/settings", data={"tool_steps": "2", "tool_choice": "required"})
    assert r.status_code == 200
    settings = c.get(f"/api/dialogs/{did}").json()["settings"]
    assert (settings["tool_steps"], settings["tool_choice"]) == (2, "required")
    r = c.post(f"/d/{did}/settings", data={"tool_steps": "99"})
    assert "tool_steps must be a whole number from 0 to 50" in r.text
    assert c.get(f"/api/dialogs/{did}").json()["settings"]["tool_steps"] == 2
