"""A prompt with `$`df`` and `&`scale`` asked in a real Chromium: the call and its result appear in the reply's live
stream while the loop runs, then in the finished reply, with a note for an unknown name. Real app, kernel, SmolLM2."""

from __future__ import annotations

import pytest

from browserhelpers import model_server, playwright_api, shot, until

pytestmark = pytest.mark.browser

expect = playwright_api().expect

SETUP = '''
import pandas as pd
df = pd.DataFrame({"city": ["Oslo", "Lima"], "temp_c": [4.5, 19.0]})

def scale(n: int) -> int:
    """Multiply n by ten."""
    return n * 10
'''

# Records every text the reply's live area shows, so a line that is swapped out at the end is still seen.
RECORD_LIVE = """
window.__liveSeen = [];
new MutationObserver(() => {
  for (const pre of document.querySelectorAll('.reply-live')) window.__liveSeen.push(pre.textContent);
}).observe(document.body, {subtree: true, childList: true, characterData: true});
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from model_server(tmp_path_factory, "browser-tools", "--max-tokens", "48", "--tool-choice", "required")


def test_tool_calls_show_live_and_in_the_finished_reply(watched, server, api):
    did = api.post("/api/dialogs", json={"title": "tools"}).json()["id"]
    code = api.post(f"/api/dialogs/{did}/messages", json={"type": "code", "source": SETUP}).json()["id"]
    assert api.post(f"/api/messages/{code}/run").json()["status"] == "ok"
    p = api.post(f"/api/dialogs/{did}/messages", json={
        "type": "prompt", "source": "Is $`df` warm, and what is $`nosuch`? Call &`scale` on a temperature."}
    ).json()["id"]
    page = watched.page
    page.goto(f"{server.base}/d/{did}")
    page.evaluate(RECORD_LIVE)
    page.locator(f"#cell-{p}").click()
    page.keyboard.press("Escape")
    page.keyboard.press("Control+Enter")
    reply = page.locator(f"#reply-{p}")
    expect(reply.locator(".tool-steps")).to_be_visible(timeout=120_000)
    until(page, "!document.querySelector('.streaming')", timeout=120)
    call = reply.locator("li.tool-call").first
    label = call.locator("code").inner_text()
    assert label.startswith("scale(n="), label
    n = int(label[len("scale(n="):-1])
    expect(call.locator(".tool-result")).to_have_text(str(n * 10))
    expect(call.locator(".tool-status")).to_have_text("ok")
    expect(reply.locator(".note-refs")).to_contain_text("$`nosuch`")
    seen = page.evaluate("window.__liveSeen.join('\\n')")
    assert f"→ {label}: ok: {n * 10}" in seen, seen[-500:]
    shot(page, "prompt-tools")
