"""The Settings panel in a real Chromium: opened from the keyboard, typed into, saved, and still there after a reload."""

from __future__ import annotations

import pytest

from apphelpers import TOKEN, Server
from browserhelpers import VIEWPORT, Watched, launch, playwright_api, shot, until
from dialog import Store
from execfeedback.adapters import registry as adapters

pytestmark = pytest.mark.browser

sync_api = playwright_api()
expect = sync_api.expect

ADAPTER = "coder-fix-v1"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("browser-settings"), "--model", "/no/model/for/these/tests.gguf").start()
    store = Store(s.data_dir)
    try:
        folder = adapters.adapters_dir(store)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{ADAPTER}.gguf").write_bytes(b"GGUF small adapter")
        adapters.register(store, {"name": ADAPTER, "file_name": f"{ADAPTER}.gguf", "sha256": "aa" * 32,
                                  "size_bytes": 18, "base_model": "smollm2-135m",
                                  "base_file": "SmolLM2-135M-Instruct.Q4_1.gguf", "base_sha256": "b1" * 32,
                                  "architecture": "llama"})
    finally:
        store.close()
    yield s
    s.stop()


def test_settings_panel_from_the_keyboard(server, tmp_path):
    with sync_api.sync_playwright() as playwright:
        browser = launch(playwright)
        context = browser.new_context(viewport=VIEWPORT)
        w = Watched(context)
        page, kb = w.page, w.page.keyboard
        page.set_default_timeout(20_000)
        page.goto(f"{server.base}/?token={TOKEN}")
        with server.client() as api:
            did = api.post("/api/dialogs", json={"title": "Settings in a browser"}).json()["id"]
            for source in ("x = 1", "y = 2"):
                api.post(f"/api/dialogs/{did}/messages", json={"type": "code", "source": source})
            page.goto(f"{server.base}/d/{did}")
            until(page, "!!document.querySelector('article.cell.selected')")
            cells = page.locator("#cells > article.cell")
            expect(cells).to_have_count(2)

            # Open it from the keyboard: focus its summary, press Enter.
            page.locator("#settings summary").focus()
            kb.press("Enter")
            form = page.locator("#settings form")
            expect(form).to_be_visible()
            # Command keys typed into the panel's fields are text, not commands: no cell is added or deleted.
            page.locator("#settings textarea[name=system_prompt]").click()
            kb.type("abdd zx")
            kb.press("Enter")
            kb.type("Answer in one line.")
            rounds = page.locator("#settings input[name=rounds]")
            rounds.click()
            kb.press("Control+a")
            kb.type("2")
            kb.press("a")  # not a number: the input drops it, and app.js must not add a cell for it
            page.locator("#settings select[name=adapter]").select_option(ADAPTER)
            page.locator("#settings select[name=retry]").focus()
            kb.press("d")
            kb.press("d")  # "d d" in command mode deletes a cell; in a select it only picks an option
            expect(cells).to_have_count(2)
            page.locator("#settings select[name=retry]").select_option("repair")

            page.get_by_role("button", name="Save settings").click()
            expect(page.locator("#toast .toast-msg", has_text="Settings saved")).to_be_visible()
            expect(page.locator("#autorun-note")).to_contain_text(f"· adapter {ADAPTER}")
            expect(cells).to_have_count(2)
            saved = api.get(f"/api/dialogs/{did}").json()["settings"]
            assert saved == {"adapter": ADAPTER, "rounds": 2, "retry": "repair",
                             "system_prompt": "abdd zx\nAnswer in one line."}
            shot(page, "settings-saved")

            # A refused save: the adapter is gone from the registry. A toast says so and nothing changes.
            store = Store(server.data_dir)
            try:
                adapters.remove(store, ADAPTER)
            finally:
                store.close()
            page.locator("#settings input[name=candidates]").fill("4")
            page.get_by_role("button", name="Save settings").click()
            expect(page.locator("#toast .toast-msg", has_text=f"There is no adapter '{ADAPTER}'")).to_be_visible()
            assert api.get(f"/api/dialogs/{did}").json()["settings"] == saved

            # After a reload the values are still there.
            page.reload()
            until(page, "!!document.querySelector('article.cell.selected')")
            page.locator("#settings summary").click()
            expect(page.locator("#settings input[name=rounds]")).to_have_value("2")
            expect(page.locator("#settings input[name=candidates]")).to_have_value("")
            expect(page.locator("#settings select[name=retry]")).to_have_value("repair")
            expect(page.locator("#settings textarea[name=system_prompt]")).to_have_value("abdd zx\nAnswer in one line.")
            expect(page.locator("#settings select[name=adapter]")).to_have_value(ADAPTER)
            expect(page.locator("#autorun-note")).to_contain_text(f"adapter {ADAPTER}")
        context.close()
        browser.close()
        w.check()
