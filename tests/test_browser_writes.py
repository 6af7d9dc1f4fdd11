"""The page's writes in a real Chromium: a tab that missed a newer edit is told, never obeyed; Log out ends the
login for good."""

from __future__ import annotations

import pytest

from apphelpers import TOKEN, Server
from browserhelpers import VIEWPORT, Watched, playwright_api, until

pytestmark = pytest.mark.browser

expect = playwright_api().expect

# The log-in page a logged-out browser gets is a 401, which Chromium reports on the console.
LOGGED_OUT = (r"status of 401",)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("browser-writes"), "--model", "/no/model/needed.gguf",
               "--exec-timeout", "20").start()
    yield s
    s.stop()


def open_page(browser, server, did, allow=()):
    context = browser.new_context(viewport=VIEWPORT)
    w = Watched(context, allow_errors=allow)
    w.page.set_default_timeout(20_000)
    w.page.goto(f"{server.base}/?token={TOKEN}")
    w.page.goto(f"{server.base}/d/{did}")
    until(w.page, "document.querySelectorAll('.cm-editor').length >= 2 && !!document.querySelector('article.cell.selected')")
    return context, w


def test_a_stale_tab_cannot_put_its_older_text_back(browser, server, api):
    did = api.post("/api/dialogs", json={"title": "two writers"}).json()["id"]
    code = api.post(f"/api/dialogs/{did}/messages", json={"type": "code", "source": "print('from the page')"}).json()["id"]
    note = api.post(f"/api/dialogs/{did}/messages", json={"type": "note", "source": "note as loaded"}).json()["id"]
    context, w = open_page(browser, server, did)
    page = w.page
    try:
        # Someone else writes both cells after this tab loaded them.
        api.patch(f"/api/messages/{code}", json={"source": "print('from the API')"})
        api.patch(f"/api/messages/{note}", json={"source": "note from the API"})
        # Ctrl+Enter in the old tab: refused with a message; the newer text stays, and nothing ran.
        page.keyboard.press("Control+Enter")
        expect(page.locator("#toast .toast-msg", has_text="changed elsewhere")).to_be_visible()
        until(page, "loopbook.page.queue().length === 0 && !document.querySelector('.cell.running')")
        m = api.get(f"/api/messages/{code}").json()
        assert m["source"] == "print('from the API')" and m["outputs"] == [] and m["execution_count"] is None
        # Shift+Enter on the note (rendering it saves it first): refused the same way.
        page.keyboard.press("ArrowDown")
        page.keyboard.press("Shift+Enter")
        expect(page.locator("#toast .toast-msg", has_text="changed elsewhere")).to_have_count(2)
        assert api.get(f"/api/messages/{note}").json()["source"] == "note from the API"
        # Reloaded, the tab has the newer text: an edit and a run now go through.
        page.reload()
        until(page, "document.querySelectorAll('.cm-editor').length >= 2 && !!document.querySelector('article.cell.selected')")
        page.keyboard.press("Enter")
        page.keyboard.press("Control+End")
        page.keyboard.type(" ; print('edited')")
        page.keyboard.press("Control+Enter")
        expect(page.locator(f"#cell-{code} .outputs pre.out-stream")).to_contain_text("from the API")
        assert api.get(f"/api/messages/{code}").json()["source"] == "print('from the API') ; print('edited')"
        expect(page.locator("#toast .toast-msg", has_text="changed elsewhere")).to_have_count(0, timeout=15_000)
    finally:
        context.close()
    w.check()


def test_log_out_from_the_page_ends_the_login(browser, server, api):
    did = api.post("/api/dialogs", json={"title": "log out"}).json()["id"]
    api.post(f"/api/dialogs/{did}/messages", json={"type": "code", "source": "x = 1"})
    api.post(f"/api/dialogs/{did}/messages", json={"type": "note", "source": "n"})
    context, w = open_page(browser, server, did, allow=LOGGED_OUT)
    page = w.page
    try:
        cookie = next(c for c in context.cookies() if c["name"] == f"loopbook_session_{server.port}")
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["value"].startswith("lbs_")
        button = page.locator("header.topbar form.logout button")
        expect(button).to_be_visible()
        button.click()
        expect(page.locator("h1")).to_have_text("Logged out")
        assert not [c for c in context.cookies() if c["name"].startswith("loopbook_session")]
        page.goto(f"{server.base}/d/{did}")
        expect(page.locator("body")).to_contain_text("Log in with the URL Loopbook printed")
        # The cookie's value, replayed by anyone who copied it, opens nothing either.
        r = api.get(f"/d/{did}", headers={"Authorization": "", "Cookie": f"{cookie['name']}={cookie['value']}"})
        assert r.status_code == 401
    finally:
        context.close()
    w.check()
