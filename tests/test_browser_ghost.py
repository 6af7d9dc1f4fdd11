"""Ghost text in a real Chromium with the real app and SmolLM2: Alt+. asks, a pause in typing asks, Tab takes it
into the cell, Esc and typing on drop it, and each outcome (accepted, edited, dropped) reaches the store."""

from __future__ import annotations

import sqlite3
import time

import pytest

from browserhelpers import model_server, playwright_api, shot, until

pytestmark = pytest.mark.browser

expect = playwright_api().expect
CODE = "import math\n\n\ndef area(r):\n    return math."


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from model_server(tmp_path_factory, "browser-ghost", "--ghost-delay", "400", "--exec-timeout", "30")


def open_cell(watched, server, api, source=""):
    did = api.post("/api/dialogs", json={"title": "ghost"}).json()["id"]
    mid = api.post(f"/api/dialogs/{did}/messages", json={"type": "code", "source": source}).json()["id"]
    page = watched.page
    page.goto(f"{server.base}/d/{did}")
    until(page, "!!document.querySelector('article.cell.selected .cm-editor')")
    page.keyboard.press("Enter")
    until(page, f"document.querySelector('#cell-{mid}').classList.contains('editing')")
    page.evaluate(f"(() => {{ const v = loopbook.editors.get('{mid}'); "
                  f"v.dispatch({{selection: {{anchor: v.state.doc.length}}}}); }})()")
    return did, mid


def text(page, mid) -> str:
    return page.evaluate(f"loopbook.editors.value('{mid}')")


def outcomes(server) -> list[tuple]:
    conn = sqlite3.connect(f"file:{server.data_dir / 'loopbook.db'}?mode=ro", uri=True)
    try:
        return conn.execute("SELECT id, suggestion, outcome, final FROM completions ORDER BY id").fetchall()
    finally:
        conn.close()


def outcome_of(server, suggestion_id: int, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = next((r for r in outcomes(server) if r[0] == suggestion_id), None)
        if row and row[2]:
            return row
        time.sleep(0.1)
    raise AssertionError(f"no outcome for completion {suggestion_id}: {outcomes(server)}")


def test_alt_period_shows_ghost_text_tab_takes_it_esc_and_typing_drop_it(watched, server, api):
    page, kb = watched.page, watched.page.keyboard
    did, mid = open_cell(watched, server, api, CODE)
    ghost = page.locator(f"#cell-{mid} .ghost-text")
    kb.press("Alt+.")
    expect(ghost).to_have_count(1, timeout=30_000)
    suggestion = ghost.text_content()
    assert suggestion.strip() and text(page, mid) == CODE  # shown, not in the document
    shot(page, "16-ghost-text")
    first = int(ghost.get_attribute("data-completion"))
    kb.press("Tab")
    expect(ghost).to_have_count(0)
    assert text(page, mid) == CODE + suggestion  # taken whole, before the kernel's completion or an indent
    assert outcome_of(server, first)[2] == "accepted"
    # Esc drops it and stays in the editor; the next Esc leaves edit mode as before.
    page.evaluate(f"(() => {{ loopbook.editors.setValue('{mid}', {CODE!r}); const v = loopbook.editors.get('{mid}'); "
                  f"v.dispatch({{selection: {{anchor: v.state.doc.length}}}}); }})()")
    before = text(page, mid)
    kb.press("Alt+.")
    expect(ghost).to_have_count(1, timeout=30_000)
    second = int(ghost.get_attribute("data-completion"))
    kb.press("Escape")
    expect(ghost).to_have_count(0)
    assert text(page, mid) == before
    assert page.evaluate(f"document.querySelector('#cell-{mid}').classList.contains('editing')")
    assert outcome_of(server, second)[2] == "dropped"
    # Typing on drops it too.
    kb.press("Alt+.")
    expect(ghost).to_have_count(1, timeout=30_000)
    third = int(ghost.get_attribute("data-completion"))
    kb.type("z")
    expect(ghost).to_have_count(0)
    assert outcome_of(server, third)[2] == "dropped"
    assert text(page, mid) == before + "z"
    # The keys are in the ? overlay.
    kb.press("Escape")
    kb.press("Escape")
    kb.press("?")
    expect(page.locator("#keys-help")).to_contain_text("ghost text")


def test_a_pause_in_typing_asks_and_an_edit_right_after_tab_counts_as_edited(watched, server, api):
    page, kb = watched.page, watched.page.keyboard
    did, mid = open_cell(watched, server, api, CODE[:-1])
    ghost = page.locator(f"#cell-{mid} .ghost-text")
    kb.type(".")  # typed, then a pause: the model is asked without a key
    expect(ghost).to_have_count(1, timeout=30_000)
    suggestion = ghost.text_content()
    cid = int(ghost.get_attribute("data-completion"))
    kb.press("Tab")
    assert text(page, mid) == CODE + suggestion
    assert outcome_of(server, cid)[2] == "accepted"
    kb.press("Backspace")  # changes the text just taken, within seconds: edited, with what it became
    row = None
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        row = next(r for r in outcomes(server) if r[0] == cid)
        if row[2] == "edited":
            break
        time.sleep(0.1)
    assert row[2] == "edited" and row[3] == suggestion[:-1], row
