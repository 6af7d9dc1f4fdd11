"""Solve in a real Chromium with the app's default settings: greedy first, and after a failure a batched round of
candidates whose groups and winner the page shows (the real app, kernels and SmolLM2)."""

from __future__ import annotations

import pytest

from browserhelpers import model_server, playwright_api, shot, until

pytestmark = pytest.mark.browser

expect = playwright_api().expect


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from model_server(tmp_path_factory, "browser-solve")  # the defaults, nothing else


CHECK = "assert tag(3) == 'q9z'\nassert tag(4) == 'q16z'"  # SmolLM2's greedy answer fails it


def test_a_failed_greedy_answer_is_followed_by_candidates_their_groups_and_a_winner(watched, server, api):
    did = api.post("/api/dialogs", json={"title": "solve with defaults"}).json()["id"]
    t = api.post(f"/api/dialogs/{did}/messages", json={"type": "code", "source": CHECK}).json()
    api.patch(f"/api/messages/{t['id']}", json={"is_test": True})
    p = api.post(f"/api/dialogs/{did}/messages",
                 json={"type": "prompt", "source": "Write a Python function tag(n) that passes the test above."}
                 ).json()["id"]
    page = watched.page
    page.goto(f"{server.base}/d/{did}")
    prompt = page.locator(f"#cell-{p}")
    prompt.click()
    page.keyboard.press("Escape")
    page.keyboard.press("s")
    # Live, while it runs: the feedback round's candidates arrive, then the round's selection line.
    expect(page.locator(f"#loop-{p} .attempts .selection")).to_contain_text("round 1 · selection", timeout=240_000)
    until(page, "!document.querySelector('.streaming')", timeout=240)
    loop = page.locator(f"#loop-{p}")
    loop.locator("summary").click()
    lines = loop.locator(".attempts li.attempt")
    texts = lines.all_inner_texts()
    assert texts[0].startswith("round 0") and "passed" not in texts[0], texts  # greedy failed the check
    round1 = [x for x in texts if x.startswith("round 1")]
    assert len(round1) == 4, texts  # the default: 4 candidates after a failure, from one batched request
    sel = loop.locator(".attempts .selection").first.inner_text()
    assert "groups" in sel and ("chosen" in sel or "no winner" in sel), sel
    marked = loop.locator(".attempt-group").all_inner_texts()
    assert len(marked) >= 4 and all(m.startswith(("group", "dropped out")) for m in marked), marked
    expect(loop.locator(".loop-cost")).to_contain_text("tokens generated")
    shot(page, "solve-defaults-candidates")
