"""A Solve's candidates, their groups, the winner and what it spent, as the page and the API show them: the real
app, the real SmolLM2 engine and kernel, the candidates' replies forced by a grammar (tests/loophelpers.py)."""
from __future__ import annotations

import html
import json
import re

import pytest

from execfeedback.workspace import workspace as workspace_module
from local_model import Engine, load_backend
from loophelpers import scripted
from test_app_live import PAGE, sse

SCRIPT = {(0, 0): "def f(x):\n    return x * 3",   # greedy fails the visible check
          (0, 1): "def f(x):\n    return x + 2",   # passes the check, behaves apart from 2 and 3
          (0, 2): "def f(x):\n    return x * 2",
          (0, 3): "def f(x):\n    return x + x"}


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    e = Engine(load_backend("smollm2-135m", data_dir=tmp_path_factory.mktemp("model")))
    yield e
    e.close()


def text(fragment: str) -> str:
    return html.unescape(re.sub(r"<[^>]+>", " ", fragment))


def test_the_page_shows_each_candidate_its_group_the_winner_and_the_cost(app_client, engine, monkeypatch):
    c, ws = app_client, app_client.app.state.ws

    async def engine_for(body, settings):
        return engine

    monkeypatch.setattr(ws, "engine_for", engine_for)
    monkeypatch.setattr(workspace_module, "Loop", scripted(SCRIPT))
    did = c.post("/api/dialogs", json={"title": "selection"}).json()["id"]
    t = c.post(f"/api/dialogs/{did}/messages", json={"type": "code", "source": "assert f(2) == 4"}).json()["id"]
    c.patch(f"/api/messages/{t}", json={"is_test": True})
    p = c.post(f"/api/dialogs/{did}/messages", json={"type": "prompt", "source": "Write f."}).json()["id"]
    with c.stream("POST", f"/api/messages/{p}/solve", json={"candidates": 4, "rounds": 0, "max_tokens": 64},
                  headers={"Accept": "text/event-stream"}) as r:
        got = [(e, json.loads(d)) for e, d in sse(r)]
    selected = [d for e, d in got if e == "selected"]
    assert len(selected) == 1 and selected[0]["selection"]["winner"] == 2, got
    summary = next(d for e, d in got if e == "done")["summary"]
    assert summary["status"] == "passed"
    spent = summary["spent"]
    # four candidates from one batched generation (the prompt read once), and the model's test inputs from one more
    inputs_tokens = summary["attempts"][0]["selection"]["inputs_tokens"]
    assert spent["attempts"] == 4 and spent["generations"] == 1 + (inputs_tokens > 0)
    assert spent["completion_tokens"] == sum(a["completion_tokens"] for a in summary["attempts"]) + inputs_tokens > 0
    assert [a["selection"]["group"] for a in summary["attempts"]] == [None, 1, 0, 0]

    # Live: the page's stream puts a selection line after the candidates' lines.
    with c.stream("GET", f"/cells/{p}/loop-stream", headers=PAGE) as r:
        page = list(sse(r))
    lines = text(" ".join(d for e, d in page if e == "attempt"))
    assert "round 0 · candidate 3" in lines
    assert "selection" in lines and "{2, 3} {1}" in lines and "candidate 2 chosen" in lines

    # After: the cell's collapsed loop view marks each candidate's group and the chosen one, and the cost.
    cell = text(c.get(f"/d/{did}").text)
    assert re.search(r"round 0 · candidate 2 .*?passed\s+group 1 · chosen", cell), cell
    assert re.search(r"round 0 · candidate 1 .*?passed\s+group 2(?! · chosen)", cell)
    assert re.search(r"round 0 · candidate 0\s+check failed.*?dropped out", cell)
    gens = spent["generations"]
    assert f"{spent['completion_tokens']:,} tokens generated in {gens} generation{'s' if gens > 1 else ''}" in cell

    trace = text(c.get(f"/traces/{summary['trace_id']}").text)
    assert "Selection: group 1 of 2 · chosen" in trace and "dropped out: check_failed" in trace
    assert "Spent:" in trace


def test_solve_reads_a_variable_named_in_its_prompt_into_its_own_turn(app_client, engine, monkeypatch):
    c, ws = app_client, app_client.app.state.ws
    seen = []

    async def engine_for(body, settings):
        return engine

    class Seeing(scripted({(0, 0): "def f(x):\n    return x * 2"})):
        async def run(self, task, should_stop=None):
            seen.append(task.messages)
            async for ev in super().run(task, should_stop):
                yield ev

    monkeypatch.setattr(ws, "engine_for", engine_for)
    monkeypatch.setattr(workspace_module, "Loop", Seeing)
    did = c.post("/api/dialogs", json={"title": "solve refs"}).json()["id"]
    code = c.post(f"/api/dialogs/{did}/messages", json={"type": "code", "source": "factor = 2"}).json()["id"]
    assert c.post(f"/api/messages/{code}/run").json()["status"] == "ok"
    p = c.post(f"/api/dialogs/{did}/messages",
               json={"type": "prompt", "source": "Write f multiplying by $`factor`; see $`nosuch`."}).json()["id"]
    with c.stream("POST", f"/api/messages/{p}/solve", json={"rounds": 0}, headers={"Accept": "text/event-stream"}) as r:
        got = [(e, json.loads(d)) for e, d in sse(r)]
    last = seen[0][-1]["content"]
    assert "`factor` (int) = 2" in last and "$`" not in last, last
    notes = [d["text"] for e, d in got if e == "note"]
    assert any("nosuch" in n for n in notes), got
    assert c.get(f"/api/messages/{p}").json()["source"].endswith("see $`nosuch`.")  # the cell keeps what was written


def test_fresh_samples_after_a_failure_are_marked_on_the_page_and_the_trace(app_client, engine, monkeypatch):
    c, ws = app_client, app_client.app.state.ws

    async def engine_for(body, settings):
        return engine

    monkeypatch.setattr(ws, "engine_for", engine_for)
    monkeypatch.setattr(workspace_module, "Loop", scripted({
        (0, 0): "def f(x):\n    return x * 3", (1, 0): "def f(x):\n    return x * 3 + 0",
        (1, 1): "def f(x):\n    return x + 2", (1, 2): "def f(x):\n    return x * 2",
        (1, 3): "def f(x):\n    return x + x"}))
    did = c.post("/api/dialogs", json={"title": "fresh"}).json()["id"]
    t = c.post(f"/api/dialogs/{did}/messages", json={"type": "code", "source": "assert f(2) == 4"}).json()["id"]
    c.patch(f"/api/messages/{t}", json={"is_test": True})
    p = c.post(f"/api/dialogs/{did}/messages", json={"type": "prompt", "source": "Write f."}).json()["id"]
    with c.stream("POST", f"/api/messages/{p}/solve", json={"rounds": 1, "retry_candidates": 4, "retry_fresh": 2,
                                                           "max_tokens": 64},
                  headers={"Accept": "text/event-stream"}) as r:
        got = [(e, json.loads(d)) for e, d in sse(r)]
    summary = next(d for e, d in got if e == "done")["summary"]
    assert summary["status"] == "passed"
    fresh = {a["candidate"]: a["selection"]["fresh"] for a in summary["attempts"] if a["round"] == 1}
    assert fresh == {0: False, 1: False, 2: True, 3: True}
    cell = text(c.get(f"/d/{did}").text)
    assert re.search(r"round 1 · candidate 2 · fresh sample of the task\s+passed\s+group 1 · chosen", cell), cell
    assert "round 1 · candidate 1 · fresh" not in cell
    trace = text(c.get(f"/traces/{summary['trace_id']}").text)
    assert trace.count("a fresh sample of the task, the failure unseen") == 2
