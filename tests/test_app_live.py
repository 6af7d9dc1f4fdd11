"""Live output in process (create_app, real kernels): a running cell's outputs reach its SSE stream as the kernel
sends them, rendered as the finished cell's are; clear_output and late subscribers; Solve's executions too."""

from __future__ import annotations

import asyncio
import json
import re
import threading

import pytest

from execfeedback.workspace.live import OutputsLive
from kernels import apply_events

PAGE = {"HX-Request": "true"}


@pytest.fixture
def c(app_client):
    return app_client


def new_code_cell(c, source: str) -> int:
    did = c.post("/api/dialogs", json={"title": "live"}).json()["id"]
    return c.post(f"/api/dialogs/{did}/messages", json={"type": "code", "source": source}).json()["id"]


def sse(response):
    """(event, data) pairs of an SSE answer, as they come."""
    event, data = None, []
    for line in response.iter_lines():
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: "):
            data.append(line[6:])
        elif line == "" and event:
            yield event, "\n".join(data)
            event, data = None, []


def run_while_following(c, mid: int) -> tuple[list[dict], str, object]:
    """Run the cell (the page's Run) while following its run stream, as the page does: the live events, the
    stream's final cell, the Run's answer."""
    answer = {}

    def run():
        answer["r"] = c.post(f"/cells/{mid}/run", headers=PAGE)

    events, done = [], None
    with c.stream("GET", f"/cells/{mid}/run-stream?wait=1", headers=PAGE) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        t = threading.Thread(target=run)
        t.start()
        for event, data in sse(r):
            if event == "outputs":
                events.append(json.loads(data))
            elif event == "done":
                done = data
                break
    t.join(60)
    return events, done, answer["r"]


def apply_page(page: list[str], ev: dict) -> list[str]:
    """What static/app.js does with an event, on a list of output HTML."""
    for i, html in ev["set"]:
        if i < len(page):
            page[i] = html
        else:
            page.append(html)
    del page[ev["n"]:]
    return page


TQDM = ("from tqdm import tqdm\nimport time\nfor _ in tqdm(range(20), ascii=True, mininterval=0):\n"
        "    time.sleep(0.1)\n")


def test_a_tqdm_bar_moves_live_and_ends_as_stored(c):
    mid = new_code_cell(c, TQDM)
    events, done, answer = run_while_following(c, mid)
    assert answer.status_code == 200
    assert events[0] == {"clear": True, "n": 0, "set": []}  # the old outputs go as the run starts
    page: list[str] = []
    shown = []
    for ev in events:
        apply_page(page, ev)
        shown.append("".join(page))
    percents = {p for s in shown for p in re.findall(r"(\d+)%\|", s)}
    assert len(percents) >= 4, percents  # the bar moved while the cell ran
    # One line, rewritten in place (the kernel folds \r), and the last view is the stored one.
    assert "100%" in shown[-1] and shown[-1].count("%|") == 1
    stored = c.get(f"/api/messages/{mid}").json()["outputs"]
    assert len(stored) == 1 and "100%" in stored[0]["text"]
    assert "100%" in done and f'id="cell-{mid}"' in done and 'data-live' not in done
    assert "100%" in answer.text


def test_clear_output_wait_replaces_outputs(c):
    code = ("from IPython.display import clear_output, display\nimport time\n"
            "for i in range(5):\n    clear_output(wait=True)\n    print(f'step {i}', flush=True)\n    time.sleep(0.15)\n")
    mid = new_code_cell(c, code)
    events, done, _ = run_while_following(c, mid)
    page: list[str] = []
    views = [" ".join(apply_page(page, ev)) for ev in events]
    assert any("step 1" in v for v in views) and "step 4" in views[-1]
    assert all(v.count("step") <= 1 for v in views), views  # never two steps at once: clear_output worked
    assert "step 4" in done and "step 3" not in done


def test_update_display_data_updates_in_place(c):
    code = ("from IPython.display import display, update_display\nimport time\n"
            "display('first', display_id='x')\nprint('below', flush=True)\ntime.sleep(0.2)\n"
            "update_display('second', display_id='x')\ntime.sleep(0.2)\n")
    mid = new_code_cell(c, code)
    events, done, _ = run_while_following(c, mid)
    page: list[str] = []
    views = [list(apply_page(page, ev)) for ev in events]
    assert any("first" in v[0] for v in views if v)
    assert "second" in views[-1][0] and "below" in views[-1][1]


def test_a_page_loaded_mid_run_follows_it(c):
    mid = new_code_cell(c, "import time\nprint('early', flush=True)\ntime.sleep(1.5)\nprint('late')")
    t = threading.Thread(target=lambda: c.post(f"/cells/{mid}/run", headers=PAGE))
    t.start()
    try:
        for _ in range(100):
            page = c.get(f"/d/{c.get(f'/api/messages/{mid}').json()['dialog_id']}").text
            if f'id="out-{mid}" class="outputs status-none" data-live="run"' in page:
                break
            threading.Event().wait(0.05)
        else:
            pytest.fail("the page never showed the run as live")
        with c.stream("GET", f"/cells/{mid}/run-stream", headers=PAGE) as r:
            got = list(sse(r))
    finally:
        t.join(30)
    outputs = [json.loads(d) for e, d in got if e == "outputs"]
    assert any("early" in html for ev in outputs for _, html in ev["set"])
    assert got[-1][0] == "done" and "late" in got[-1][1]


def test_a_stream_with_no_run_ends_at_once(c):
    mid = new_code_cell(c, "1")
    with c.stream("GET", f"/cells/{mid}/run-stream", headers=PAGE) as r:
        got = list(sse(r))
    assert [e for e, _ in got] == ["done"]
    assert c.get("/cells/999999/run-stream").status_code == 200  # an unknown cell: its message, as a done event


def test_a_flood_is_batched_and_stored_capped(c):
    mid = new_code_cell(c, "for i in range(300_000):\n    print(i)\n")
    events, done, answer = run_while_following(c, mid)
    assert answer.status_code == 200
    assert len(events) < 400  # batched (at most one per 40 ms), not one per line
    assert all(len(json.dumps(ev)) < 100_000 for ev in events)  # each shows the head, collapsed, as the page does
    meta = c.get(f"/api/messages/{mid}").json()["output_meta"]
    assert meta["truncated"] and meta["original_chars"] > 1_000_000


def test_outputs_live_follow_is_the_view_for_any_follower():
    async def go():
        view = OutputsLive("run-1")
        first = view.follow()
        view.on_batch([{"output_type": "stream", "name": "stdout", "text": "a\n", "index": 0}])
        got = [await first.__anext__()]
        view.on_batch([{"output_type": "stream", "name": "stdout", "text": "b\n", "index": 0, "start": 2},
                       {"output_type": "display_data", "data": {"text/plain": "d"}, "metadata": {}, "index": 1}])
        got.append(await first.__anext__())
        late = view.follow()
        whole = await late.__anext__()
        view.on_batch([{"output_type": "clear_output", "wait": False},
                       {"output_type": "stream", "name": "stdout", "text": "c\n", "index": 0}])
        got.append(await first.__anext__())
        view.close()
        rest = [x async for x in first]
        return got, whole, rest

    got, whole, rest = asyncio.run(go())
    assert got[0][:2] == (False, [0]) and got[0][2][0]["text"] == "a\n"
    assert got[1][:2] == (False, [0, 1]) and got[1][2][0]["text"] == "a\nb\n"
    assert whole[:2] == (False, [0, 1]) and whole[2] == apply_events([], [{**o, "index": i} for i, o in
                                                                         enumerate(whole[2])])
    assert got[2][0] is True and got[2][2] == [{"output_type": "stream", "name": "stdout", "text": "c\n"}]
    assert rest == []


class ScriptedEngine:
    """An engine that always answers with the same code (the loop's executions are what is under test here)."""

    class backend:
        n_ctx = 4096

        @staticmethod
        def count_tokens(text: str) -> int:
            return len(text) // 4 + 1

    manifest = {"model": "scripted", "backend": "test"}

    def __init__(self, reply: str):
        self.reply = reply

    def cancel(self, request_id) -> bool:
        return False

    async def stream(self, messages, sampling, cache_key=None, request_id=None):
        yield {"type": "token", "text": self.reply}
        yield {"type": "done", "text": self.reply, "figures": {}, "finish_reason": "stop"}


def test_solve_streams_each_candidates_outputs_live(c, monkeypatch):
    ws = c.app.state.ws
    code = "import time\nfor i in range(4):\n    print(f'tick {i}', flush=True)\n    time.sleep(0.15)\n"

    async def engine_for(body, settings):
        return ScriptedEngine(f"```python\n{code}```")

    monkeypatch.setattr(ws, "engine_for", engine_for)
    did = c.post("/api/dialogs", json={"title": "solve live"}).json()["id"]
    p = c.post(f"/api/dialogs/{did}/messages", json={"type": "prompt", "source": "tick four times"}).json()["id"]
    # The API's stream: "outputs" events carry the kernel's batches as they come.
    with c.stream("POST", f"/api/messages/{p}/solve", json={"rounds": 0},
                  headers={"Accept": "text/event-stream"}) as r:
        got = [(e, json.loads(d)) for e, d in sse(r)]
    batches = [d["events"] for e, d in got if e == "outputs"]
    assert len(batches) >= 2, got  # more than the final state: it arrived while the code ran
    seen: list[dict] = []
    for b in batches:
        apply_events(seen, b)
    assert seen[0]["text"] == "tick 0\ntick 1\ntick 2\ntick 3\n"
    kinds = [e for e, _ in got]
    assert kinds.index("outputs") > kinds.index("attempt_start") and kinds.index("outputs") < kinds.index("attempt")
    # The page's stream (replayed for a late subscriber): the rendered outputs, swapped into the loop view.
    with c.stream("GET", f"/cells/{p}/loop-stream", headers=PAGE) as r:
        page = list(sse(r))
    rendered = [d for e, d in page if e == "outputs"]
    assert rendered and "tick 3" in rendered[-1] and rendered[-1].startswith('<pre class="out out-stream')
