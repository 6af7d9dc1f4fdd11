"""static/editor.js in a real Chromium: cells become CodeMirror editors that keep their textareas."""

import functools
import http.server
import os
import threading
from pathlib import Path

import pytest

from parts import require, require_module

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parent.parent

require("chromium")
sync_api = require_module("playwright.sync_api")


def cell(id, type, lang, source, readonly=False):
    flag = " data-readonly" if readonly else ""
    return (
        f'<article class="cell" id="cell-{id}" data-id="{id}" data-type="{type}">'
        f'<form hx-post="/save/{id}" hx-trigger="never">'
        f'<textarea class="cell-source" name="source" data-lang="{lang}"{flag}>{source}</textarea>'
        f"</form></article>"
    )


PAGE = f"""<!doctype html>
<html><head><meta charset="utf-8">
<script src="/static/vendor/htmx.min.js"></script>
<script src="/static/vendor/htmx-ext-sse.js"></script>
<script src="/static/vendor/codemirror.js"></script>
<script src="/static/keys.js"></script>
<script src="/static/editor.js"></script>
</head><body hx-ext="sse">
<main id="dialog">
{cell(1, "code", "python", "x = 1")}
{cell(2, "note", "markdown", "# A note")}
{cell(3, "code", "python", "frozen = True", readonly=True)}
</main>
<script>
  window.seen = [];
  for (const name of ["loopbook:run-next", "loopbook:run", "loopbook:run-insert", "loopbook:escape"]) {{
    document.addEventListener(name, (e) => window.seen.push([name, e.detail.id, e.target.id, e.detail.source]));
  }}
  window.inputs = 0;
  document.addEventListener("input", (e) => {{ if (e.target.matches("textarea.cell-source")) window.inputs += 1; }});
</script>
</body></html>
"""

# What the server sends back when the page swaps cell 1 (outerHTML).
SWAPPED_CELL = cell(1, "code", "python", "y = 2")


class Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A loopback server for a test page, the real static/ folder and one cell fragment."""
    docroot = tmp_path_factory.mktemp("site")
    (docroot / "index.html").write_text(PAGE)
    (docroot / "cell-1.html").write_text(SWAPPED_CELL)
    os.symlink(ROOT / "static", docroot / "static")
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Handler, directory=str(docroot))
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def page(browser, site):
    page = browser.new_page()
    outside, errors = [], []

    def only_loopback(route):
        # The page must work offline: anything not served by our loopback server is refused.
        if route.request.url.startswith(site):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    page.route("**/*", only_loopback)
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(f"{site}/index.html")
    page.wait_for_function("document.querySelectorAll('.cm-editor').length === 3")
    yield page
    assert not outside, f"the page tried to reach the network: {outside}"
    assert not errors, f"JavaScript errors on the page: {errors}"
    page.close()


def source(page, id):
    return page.eval_on_selector(f"#cell-{id} textarea.cell-source", "t => t.value")


def content(page, id):
    return page.locator(f"#cell-{id} .cm-content")


def test_each_cell_source_becomes_an_editor_and_the_textarea_is_hidden(page):
    assert page.locator("textarea.cell-source").count() == 3
    for id in (1, 2, 3):
        assert page.locator(f"#cell-{id} .cm-editor").count() == 1
        assert not page.locator(f"#cell-{id} textarea.cell-source").is_visible()
    assert content(page, 1).inner_text() == "x = 1"
    assert page.evaluate("window.loopbook.editors.value(document.getElementById('cell-2'))") == "# A note"


def test_typing_updates_the_hidden_textarea_and_fires_input(page):
    content(page, 1).click()
    page.keyboard.press("End")
    page.keyboard.type(" + 41")
    assert source(page, 1) == "x = 1 + 41"
    assert page.evaluate("window.inputs") == len(" + 41")


def test_shift_enter_is_reported_to_the_cell_and_inserts_no_newline(page):
    content(page, 1).click()
    page.keyboard.press("End")
    page.keyboard.press("Shift+Enter")
    assert page.evaluate("window.seen") == [["loopbook:run-next", "1", "cell-1", "x = 1"]]
    assert source(page, 1) == "x = 1"
    page.keyboard.press("Control+Enter")
    page.keyboard.press("Alt+Enter")
    page.keyboard.press("Escape")
    names = [event[0] for event in page.evaluate("window.seen")]
    assert names == ["loopbook:run-next", "loopbook:run", "loopbook:run-insert", "loopbook:escape"]
    assert source(page, 1) == "x = 1"


def test_tab_indents_shift_tab_dedents_and_enter_auto_indents(page):
    content(page, 1).click()
    page.keyboard.press("End")
    page.keyboard.press("Tab")
    assert source(page, 1) == "    x = 1"
    page.keyboard.press("Shift+Tab")
    assert source(page, 1) == "x = 1"
    page.keyboard.press("Control+a")
    page.keyboard.type("def f(")
    assert source(page, 1) == "def f()", "the bracket was not closed automatically"
    page.keyboard.press("End")
    page.keyboard.type(":")
    page.keyboard.press("Enter")
    page.keyboard.type("return 1")
    assert source(page, 1) == "def f():\n    return 1"


def test_editor_grows_with_its_content_without_an_inner_scrollbar(page):
    one_line = page.locator("#cell-1 .cm-editor").bounding_box()["height"]
    page.evaluate("loopbook.editors.setValue(document.getElementById('cell-1'), 'x = 1\\n'.repeat(40))")
    many_lines = page.locator("#cell-1 .cm-editor").bounding_box()["height"]
    assert many_lines > 20 * one_line
    overflow = page.eval_on_selector("#cell-1 .cm-scroller", "s => s.scrollHeight - s.clientHeight")
    assert overflow <= 1
    assert source(page, 1) == "x = 1\n" * 40


def test_readonly_cell_ignores_typing(page):
    content(page, 3).click()
    page.keyboard.type("zzz")
    assert source(page, 3) == "frozen = True"
    assert content(page, 3).inner_text() == "frozen = True"


def test_api_focus_value_set_value_and_language(page):
    result = page.evaluate(
        """() => {
        const ed = loopbook.editors, cell = document.getElementById('cell-2');
        const out = {};
        out.focused = ed.focus(cell) && ed.get(cell).hasFocus;
        out.cursorAtEnd = ed.get(cell).state.selection.main.head === ed.value(cell).length;
        out.byId = ed.get('2') === ed.get(cell) && ed.get('cell-2') === ed.get(cell);
        out.markdown = CM.markdownLanguage.isActiveAt(ed.get(cell).state, 1);
        const before = window.inputs;
        ed.setValue(cell, 'print(1)', {notify: false});
        out.quiet = window.inputs === before;
        ed.setLanguage(cell, 'python');
        out.python = CM.pythonLanguage.isActiveAt(ed.get(cell).state, 1);
        out.lang = cell.querySelector('textarea').dataset.lang;
        out.textarea = cell.querySelector('textarea').value;
        ed.blur(cell);
        out.blurred = !ed.get(cell).hasFocus;
        try { ed.setLanguage(cell, 'cobol'); out.badLanguage = 'accepted'; }
        catch (e) { out.badLanguage = e.message; }
        out.missing = ed.get(document.body) === null && ed.value('nope') === null;
        return out;
    }"""
    )
    assert result["focused"] and result["cursorAtEnd"] and result["byId"]
    assert result["markdown"] and result["python"] and result["lang"] == "python"
    assert result["quiet"] and result["textarea"] == "print(1)" and result["blurred"]
    assert "python, markdown" in result["badLanguage"]
    assert result["missing"]


def test_an_htmx_outerhtml_swap_gets_a_new_editor_and_destroys_the_old(page):
    page.evaluate("window.old = loopbook.editors.get(document.getElementById('cell-1'))")
    content(page, 1).click()
    page.evaluate("htmx.ajax('GET', '/cell-1.html', {target: '#cell-1', swap: 'outerHTML'})")
    page.wait_for_function("document.querySelector('#cell-1 textarea').value === 'y = 2'")
    page.wait_for_function("loopbook.editors.get(document.getElementById('cell-1')) !== window.old")
    page.wait_for_function("window.old.destroyed === true")
    assert page.locator(".cm-editor").count() == 3
    assert content(page, 1).inner_text() == "y = 2"
    # The swapped cell was being edited: its new editor takes the focus back.
    page.wait_for_function("loopbook.editors.get(document.getElementById('cell-1')).hasFocus")
    page.keyboard.type("!")
    assert source(page, 1) == "y = 2!"
