"""Hostile content in a real Chromium: notes, model replies and kernel outputs that carry scripts stay inert,
and bad notebooks sent through the page's import form are refused with a clear message, leaving nothing."""

from __future__ import annotations

import json

import pytest

from apphelpers import TOKEN, Server
from browserhelpers import VIEWPORT, Watched, playwright_api, until

pytestmark = pytest.mark.browser

expect = playwright_api().expect

# Each payload would set window.__pwned (or the parent's) if it ever ran.
PAYLOADS = [
    "<script>window.__pwned = 'script'</script>",
    "<img src=\"/no-such-image.png\" onerror=\"window.__pwned = 'onerror'\">",
    "[a markdown link](javascript:window.__pwned='md-link')",
    "<a href=\"javascript:window.__pwned='a-href'\">an html link</a>",
    "<iframe src=\"javascript:parent.__pwned='iframe'\"></iframe>",
    "<iframe srcdoc=\"<script>parent.__pwned='srcdoc'</script>\"></iframe>",
    "<svg onload=\"window.__pwned='svg'\"><circle r=\"4\"/></svg>",
    "<details open ontoggle=\"window.__pwned='toggle'\"><summary>s</summary>x</details>",
    "<form action=\"javascript:window.__pwned='form'\"><button>go</button></form>",
]
HOSTILE = "\n\n".join(PAYLOADS)

# What Chromium logs while it refuses the payloads: the script-less sandbox of an HTML output; the image that
# does not exist (its onerror handler is gone; the request stays on loopback); the same image asked for from
# inside the sandboxed frame, whose opaque origin our Cross-Origin-Resource-Policy turns away; the
# javascript: frame inside the HTML output, which the CSP the srcdoc frame inherits refuses to run.
REFUSALS = (r"Blocked script execution in 'about:srcdoc'", r"status of 404 \(Not Found\)",
            r"ERR_BLOCKED_BY_RESPONSE\.NotSameOrigin", r"^Running the JavaScript URL violates")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("browser-security"), "--model", "/no/model/needed.gguf",
               "--exec-timeout", "20").start()
    yield s
    s.stop()


def watched_page(browser, server, allow=()):
    context = browser.new_context(viewport=VIEWPORT)
    w = Watched(context, allow_errors=allow)
    w.page.set_default_timeout(20_000)
    w.page.goto(f"{server.base}/?token={TOKEN}")
    return context, w


def assert_inert(page):
    """Nothing ran, and nothing that could run is left in the page's own document."""
    assert page.evaluate("window.__pwned === undefined"), page.evaluate("window.__pwned")
    found = page.evaluate("""() => {
        const roots = [...document.querySelectorAll('.md, .md-view, .reply, .outputs')];
        const bad = [];
        for (const root of roots) {
            for (const el of root.querySelectorAll('script, iframe:not(.out-html), object, embed, form, svg')) bad.push(el.outerHTML);
            for (const el of root.querySelectorAll('*')) {
                for (const a of el.attributes) {
                    if (/^on/i.test(a.name) || /^\\s*javascript:/i.test(a.value)) bad.push(el.outerHTML);
                }
            }
        }
        return bad;
    }""")
    assert not found, f"active content reached the page: {found}"


def test_hostile_notes_replies_and_outputs_are_inert(browser, server, api):
    did = api.post("/api/dialogs", json={"title": "Hostile <script>window.__pwned='title'</script>"}).json()["id"]
    api.post(f"/api/dialogs/{did}/messages", json={"type": "note", "source": HOSTILE})
    prompt = api.post(f"/api/dialogs/{did}/messages", json={"type": "prompt", "source": "Hi"}).json()["id"]
    assert api.patch(f"/api/messages/{prompt}", json={"reply": HOSTILE}).status_code == 200
    code = ("from IPython.display import display, HTML, Markdown\n"
            f"display(HTML({HOSTILE!r}))\n"
            f"display(Markdown({HOSTILE!r}))\n"
            f"print({PAYLOADS[0]!r})")
    api.post(f"/api/dialogs/{did}/messages", json={"type": "code", "source": code})
    context, w = watched_page(browser, server, allow=REFUSALS)
    page = w.page
    try:
        page.goto(f"{server.base}/d/{did}")
        until(page, "!!document.querySelector('article.cell.selected')")
        # Run the code from the keyboard: its outputs arrive through the same swap as any run.
        page.keyboard.press("End")
        page.keyboard.press("Control+Enter")
        expect(page.locator("#cells article.cell-code .outputs iframe.out-html")).to_have_count(1, timeout=30_000)
        expect(page.locator("#cells article.cell-code .outputs pre.out-stream")).to_contain_text("<script>")
        # Edit the note and leave it: it is rendered again, still inert.
        page.keyboard.press("Home")
        page.keyboard.press("Enter")
        page.keyboard.press("Control+End")
        page.keyboard.type("\n\n<img src=/no-such-image.png onerror=\"window.__pwned='typed'\">")
        page.keyboard.press("Escape")
        until(page, "document.querySelector('#cells article.cell-note textarea').defaultValue.includes('typed')")
        # Both images of the note, the typed one too, were asked for and came back broken: an image's error event
        # fires in the task that makes it complete, so an onerror handler that survived would have run by now.
        until(page, "[...document.querySelectorAll('#cells article.cell-note img')].filter("
                    "i => i.complete && i.naturalWidth === 0 && i.getAttribute('src') === '/no-such-image.png')"
                    ".length === 2")
        assert_inert(page)
        # The links that survive have no javascript: target; following them does nothing. A fragment link
        # clicked after them is the sentinel: its hashchange comes after anything their clicks set going.
        links = page.locator("#cells .md a").all()
        assert links  # the note's html link is kept, as an inert <a>
        page.evaluate("""() => {
            window.__hashchanges = 0;
            addEventListener('hashchange', () => window.__hashchanges++);
            document.body.append(Object.assign(document.createElement('a'),
                                               {id: 'after-clicks', href: '#after-clicks', textContent: 'sentinel'}));
        }""")
        for link in links:
            link.click()
        page.locator("#after-clicks").click()
        until(page, "window.__hashchanges === 1")
        assert page.url == f"{server.base}/d/{did}#after-clicks"  # the same document, nothing else navigated
        assert_inert(page)
        # The HTML output lives in a frame with no script, no same-origin and no way out.
        frame = page.locator("iframe.out-html")
        sandbox = frame.get_attribute("sandbox")
        assert sandbox is not None and "allow-same-origin" not in sandbox and "allow-scripts" not in sandbox
        inner = page.frame_locator("iframe.out-html")
        expect(inner.locator("a").first).to_be_attached()  # the markup is there, as markup
        assert page.title().startswith("Hostile <script>")  # the title is text, not markup
        assert_inert(page)
    finally:
        context.close()
    w.check()


def test_bad_notebooks_through_the_import_form(browser, server, api, tmp_path):
    good = {"nbformat": 4, "nbformat_minor": 5, "metadata": {},
            "cells": [{"cell_type": "code", "execution_count": 1, "metadata": {}, "id": "a",
                       "source": "print(1)", "outputs": []}]}
    text = json.dumps(good)
    big = tmp_path / "huge.ipynb"
    with open(big, "wb") as f:  # 51 MB: over the 50 MB import limit
        f.write(b'{"nbformat": 4, "nbformat_minor": 5, "metadata": {}, "cells": [], "padding": "')
        f.write(b"x" * (51 * 2**20))
        f.write(b'"}')
    cases = [
        ("truncated.ipynb", text[: len(text) // 2].encode(), "truncated"),
        ("malformed.ipynb", text.replace('"cells": [', '"cells": [}').encode(), "not valid JSON"),
        ("not-a-notebook.ipynb", b'{"hello": "world"}', "not a Jupyter notebook"),
        ("empty.ipynb", b"", None),
        ("huge.ipynb", big, "over the 50 MB import limit"),
    ]
    before = len(api.get("/api/dialogs").json())
    context, w = watched_page(browser, server, allow=(r"status of 4\d\d",))
    page = w.page
    try:
        for name, body, words in cases:
            page.goto(f"{server.base}/")
            upload = str(body) if not isinstance(body, bytes) else {"name": name, "mimeType": "application/json",
                                                                   "buffer": body}
            page.locator("form.import input[type=file]").set_input_files(upload)
            page.locator("form.import button").press("Enter")
            page.wait_for_load_state()
            error = page.locator(".import-error")
            expect(error).to_be_visible(timeout=60_000)
            expect(error).to_contain_text("Nothing was imported")
            if words:
                expect(error).to_contain_text(words)
            assert len(api.get("/api/dialogs").json()) == before, f"{name} left a dialog behind"
        # nbformat 3 is upgraded on the way in, and the page says so.
        v3 = {"nbformat": 3, "nbformat_minor": 0, "metadata": {"name": "old one"},
              "worksheets": [{"cells": [{"cell_type": "code", "input": "x = 3", "language": "python",
                                         "outputs": [], "prompt_number": 1},
                                        {"cell_type": "markdown", "source": "# Old"}]}]}
        page.goto(f"{server.base}/")
        page.locator("form.import input[type=file]").set_input_files(
            {"name": "old.ipynb", "mimeType": "application/json", "buffer": json.dumps(v3).encode()})
        page.locator("form.import button").press("Enter")
        page.wait_for_url("**/d/*")
        expect(page.locator("#toast")).to_contain_text("nbformat 3")
        expect(page.locator("#cells > article.cell")).to_have_count(2)
        expect(page.locator("#cells article.cell-note .md-view h1")).to_have_text("Old")
        assert len(api.get("/api/dialogs").json()) == before + 1
    finally:
        context.close()
    w.check()
