"""The token meter: per-cell tokens, the dialog's context against n_ctx, and the cells a prompt over its budget
leaves out (in process: no model loaded, so counts are estimates; the browser test uses SmolLM2's tokenizer)."""

from __future__ import annotations

import pytest

from dialog.context import ContextOptions, build_context, cell_context_text, dropped_by_budget

PAGE = {"HX-Request": "true"}


@pytest.fixture
def c(app_client):
    return app_client


def add(c, did, type, source, **flags):
    mid = c.post(f"/api/dialogs/{did}/messages", json={"type": type, "source": source}).json()["id"]
    if flags:
        c.patch(f"/api/messages/{mid}", json=flags)
    return mid


def test_dropped_by_budget_follows_the_builders_rules():
    cells = [{"id": 1, "type": "note", "source": "a" * 40, "pinned": True},
             {"id": 2, "type": "note", "source": "b" * 400},
             {"id": 3, "type": "note", "source": "c" * 40, "skipped": True},
             {"id": 4, "type": "note", "source": "d" * 40}]
    n = {1: 10, 2: 100, 3: 10, 4: 10}
    tok = lambda m: n[m["id"]]
    assert dropped_by_budget(cells, tok, 5, 200) == []
    assert dropped_by_budget(cells, tok, 5, 100) == [2]  # oldest unpinned first; the skipped one never counts
    assert dropped_by_budget(cells, tok, 5, 20) == [2, 4]  # the pinned cell stays, over or not
    assert dropped_by_budget(cells, tok, 5, None) == []
    # The builder, counting the same way, leaves out the same cells.
    prompt = {"id": 5, "type": "prompt", "source": "q", "position": 99}
    count = lambda msgs: sum(len(m["content"]) // 4 for m in msgs[1:])
    msgs = build_context([{**m, "position": i} for i, m in enumerate(cells)], prompt,
                         options=ContextOptions(budget_tokens=100), count_tokens=count)
    text = "\n".join(m["content"] for m in msgs[1:])
    assert "b" * 400 not in text and "a" * 40 in text and "d" * 40 in text and "1 earlier cells omitted" in text


def test_cell_context_text_is_what_the_model_reads():
    code = {"id": 1, "type": "code", "source": "print(1)", "outputs": [
        {"output_type": "stream", "name": "stdout", "text": "1\n"}]}
    assert cell_context_text(code) == "```python\nprint(1)\n```\nOutput:\n```\n1\n```"
    assert cell_context_text({"id": 2, "type": "prompt", "source": " why? ", "reply": "because"}) == "why?\n\nbecause"


def test_the_api_meter_counts_cells_and_context(c):
    did = c.post("/api/dialogs", json={"title": "meter"}).json()["id"]
    code = add(c, did, "code", "print('hello meter')")
    c.post(f"/api/messages/{code}/run")
    note = add(c, did, "note", "a short note")
    skipped = add(c, did, "note", "left out " * 10, skipped=True)
    prompt = add(c, did, "prompt", "what next?")
    m = c.get(f"/api/dialogs/{did}/tokens").json()
    assert m["estimated"] is True and m["n_ctx"] == 8192  # no model here: about 4 characters a token
    cells = {int(k): v for k, v in m["cells"].items()}
    assert cells[code] == (len("```python\nprint('hello meter')\n```\nOutput:\n```\nhello meter\n```") + 3) // 4
    assert cells[skipped] > 0
    assert m["used"] == m["system_tokens"] + cells[code] + cells[note] + cells[prompt]
    assert m["budget"] == 8192 - m["max_tokens"] - 64
    assert m["prompts"][str(prompt)]["dropped"] == []
    assert c.get("/api/dialogs/999999/tokens").status_code == 404


def test_a_prompt_over_budget_names_the_cells_left_out_on_the_page(c):
    did = c.post("/api/dialogs", json={"title": "over"}).json()["id"]
    keep = add(c, did, "code", "x = 1", pinned=True)
    big = add(c, did, "note", "long words " * 4000)  # ~11,000 tokens: over an 8,192 context alone
    small = add(c, did, "note", "small note")
    prompt = add(c, did, "prompt", "summarise")
    m = c.get(f"/api/dialogs/{did}/tokens").json()
    assert m["prompts"][str(prompt)]["dropped"] == [big]
    assert m["used"] > m["budget"]
    page = c.get(f"/d/{did}").text
    assert 'id="context-meter" class="context-meter over"' in page
    assert f"context ≈{m['used']:,} / 8,192" in page
    note = page.split(f'id="budget-{prompt}"')[1].split("</div>")[0]
    assert "Over the context budget" in note and "#2 note “long words long words" in note
    assert "#1" not in note and "#3" not in note
    cell = page.split(f'id="cell-{small}"')[1].split("</article>")[0]
    assert f'<span class="tokens">≈{m["cells"][str(small)]:,} tok</span>' in cell
    # Skipping the big note: the prompt fits, and the meter fragment says so.
    c.post(f"/cells/{big}/toggle", data={"field": "skipped"}, headers=PAGE)
    frag = c.get(f"/d/{did}/meter", headers=PAGE).text
    assert 'id="context-meter" class="context-meter" ' in frag and 'hx-swap-oob="true"' in frag
    assert f'<div id="budget-{prompt}" class="budget" hx-swap-oob="true"></div>' in frag
    # One cell on its own (a swap) still carries its count and, for a prompt, its budget note.
    assert f'id="budget-{prompt}"' in c.post(f"/cells/{prompt}/toggle", data={"field": "pinned"}, headers=PAGE).text
    assert keep
