"""Two browser tabs on one cell, in a real Chromium: the page's autosave never overwrites what it did not see."""

import pytest

from apphelpers import TOKEN, Server
from browserhelpers import VIEWPORT, Watched, launch, playwright_api, until

pytestmark = pytest.mark.browser

sync_api = playwright_api()
expect = sync_api.expect


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("two-tabs"), "--model", "/no/model/needed.gguf").start()
    yield s
    s.stop()


def open_tab(context, server, did):
    w = Watched(context)
    w.page.set_default_timeout(20_000)
    w.page.goto(f"{server.base}/d/{did}")
    until(w.page, "document.querySelectorAll('.cm-editor').length >= 1 && !!document.querySelector('article.cell.selected')")
    return w


def type_at_end(page, text):
    page.keyboard.press("Enter")  # edit the selected cell
    until(page, "document.activeElement.closest('.cm-editor') !== null")
    page.keyboard.press("Control+End")
    page.keyboard.type(text)


def test_two_tabs_on_one_cell(server):
    with server.client() as api, sync_api.sync_playwright() as playwright:
        did = api.post("/api/dialogs", json={"title": "two tabs"}).json()["id"]
        mid = api.post(f"/api/dialogs/{did}/messages", json={"type": "code", "source": "x = 0"}).json()["id"]
        source = lambda: api.get(f"/api/messages/{mid}").json()["source"]
        browser = launch(playwright)
        context = browser.new_context(viewport=VIEWPORT)
        context.new_page().goto(f"{server.base}/?token={TOKEN}")
        a, b = open_tab(context, server, did), open_tab(context, server, did)
        try:
            # Tab A types, in bursts faster than its saves come back: every burst lands, no conflict.
            type_at_end(a.page, "\n# from A")
            for n in range(3):
                a.page.keyboard.type(f" {n}")
                a.page.wait_for_timeout(650)
            for _ in range(50):
                if source().endswith("# from A 0 1 2"):
                    break
                a.page.wait_for_timeout(100)
            assert source() == "x = 0\n# from A 0 1 2"
            assert a.page.locator("#toast .toast-msg").count() == 0
            # Tab B still shows x = 0: its save is refused, and B is told; A's text stays.
            type_at_end(b.page, "\n# from B")
            expect(b.page.locator("#toast")).to_contain_text("changed elsewhere", timeout=10_000)
            assert source() == "x = 0\n# from A 0 1 2"
            # A goes on saving, untroubled.
            a.page.keyboard.type("\n# A again")
            for _ in range(50):
                if source().endswith("# A again"):
                    break
                a.page.wait_for_timeout(100)
            assert source() == "x = 0\n# from A 0 1 2\n# A again"
            # B reloads, sees A's text, and can save again.
            b.page.reload()
            until(b.page, "!!document.querySelector('article.cell.selected')")
            type_at_end(b.page, "\n# B after reload")
            for _ in range(50):
                if source().endswith("# B after reload"):
                    break
                b.page.wait_for_timeout(100)
            assert source() == "x = 0\n# from A 0 1 2\n# A again\n# B after reload"
        finally:
            context.close()
            browser.close()
        a.check()
        b.check()
