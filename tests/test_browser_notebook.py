"""The notebook page in a real Chromium, driven from the keyboard: the real app, kernels and SmolLM2."""

from __future__ import annotations

import json
import re

import pytest

from browserhelpers import model_server, playwright_api, shot, until

pytestmark = pytest.mark.browser

expect = playwright_api().expect


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from model_server(tmp_path_factory, "browser", "--max-tokens", "48", "--exec-timeout", "30", "--rounds", "1")


def cell(page, n):
    """The n-th cell of the page (0-based), as a locator."""
    return page.locator("#cells > article.cell").nth(n)


def selected_id(page) -> str:
    return page.evaluate("document.querySelector('article.cell.selected')?.dataset.id ?? null")


def focus_is_command_mode(page) -> bool:
    return page.evaluate("document.activeElement.matches('article.cell.selected')")


def wait_idle(page):
    """Until the run queue is empty and nothing streams."""
    until(page, "loopbook.page.queue().length === 0 && !document.querySelector("
                "'.cell.running, .cell.queued, .streaming')", timeout=90)


def open_dialog(watched, server, api, title, cells):
    did = api.post("/api/dialogs", json={"title": title}).json()["id"]
    for c in cells:
        api.post(f"/api/dialogs/{did}/messages", json=c)
    watched.page.goto(f"{server.base}/d/{did}")
    until(watched.page, f"document.querySelectorAll('.cm-editor').length >= {len(cells)} "
                        "&& !!document.querySelector('article.cell.selected')")
    return did


def test_a_session_from_the_keyboard(watched, server, api, tmp_path):
    page = watched.page
    kb = page.keyboard
    # Counts the reply's tokens as they arrive over SSE, on every page this test opens.
    page.add_init_script("""window.__sse = {token: 0, attempt: 0, done: 0};
        document.addEventListener('htmx:sseMessage', e => { window.__sse[e.detail.type] += 1; });""")

    # A new dialog from the home page: its title field has the focus.
    until(page, "document.activeElement.matches('form.new-dialog input')")
    kb.type("Keyboard session")
    kb.press("Enter")
    page.wait_for_url("**/d/*")
    did = page.url.rsplit("/", 1)[1]
    # It opens on one empty code cell, in edit mode.
    until(page, "document.activeElement.closest('.cm-editor') !== null")
    assert page.locator("#cells > article.cell").count() == 1
    expect(page.locator("#kernel-state")).to_have_text("kernel: not started")

    kb.type("import math\nprint('hello', 6 * 7)")
    kb.press("Shift+Enter")
    first = cell(page, 0)
    expect(first.locator(".outputs")).to_contain_text("hello 42", timeout=60_000)
    expect(first.locator(".exec-count")).to_have_text("[1]")
    # Shift+Enter on the last cell adds a new one and edits it.
    expect(page.locator("#cells > article.cell")).to_have_count(2)
    until(page, "document.activeElement.closest('article.cell') === "
                           "document.querySelectorAll('#cells > article.cell')[1]")
    expect(page.locator("#kernel-state")).to_have_text("kernel: idle")

    # A note: Esc, m, Enter, type, Esc: it shows rendered.
    kb.press("Escape")
    assert focus_is_command_mode(page)
    kb.press("m")
    expect(cell(page, 1)).to_have_attribute("data-type", "note")
    kb.press("Enter")
    kb.type("# Findings\n\nThe answer is *42*.")
    kb.press("Escape")
    expect(cell(page, 1).locator(".md-view h1")).to_have_text("Findings")
    expect(cell(page, 1).locator(".md-view em")).to_have_text("42")
    expect(cell(page, 1).locator(".cm-editor")).to_be_hidden()

    # A prompt, asked with Ctrl+Enter: the reply streams in.
    kb.press("b")
    expect(page.locator("#cells > article.cell")).to_have_count(3)
    kb.press("p")
    expect(cell(page, 2)).to_have_attribute("data-type", "prompt")
    kb.press("Enter")
    kb.type("What does the code above print? Answer in one sentence.")
    kb.press("Control+Enter")
    prompt = cell(page, 2)
    expect(prompt.locator(".reply .md")).not_to_be_empty(timeout=60_000)
    wait_idle(page)
    assert page.evaluate("window.__sse.token") > 0, "no token arrived over SSE"
    expect(prompt.locator(".md-view")).to_contain_text("What does the code above print?")
    expect(prompt.locator(".reply .figures")).to_contain_text("generated")
    shot(page, "01-code-note-prompt")

    # Solve: a prompt, then s; the attempts show under it and the code lands below it.
    kb.press("b")
    kb.press("p")
    kb.press("Enter")
    kb.type("Write a Python function add(a, b) that returns a + b.")
    kb.press("Escape")
    kb.press("s")
    solve = cell(page, 3)
    wait_idle(page)
    assert page.evaluate("window.__sse.attempt") > 0, "no attempt was reported live"
    # Typed right after b p Enter, before the new cell existed: every character landed in it.
    assert api.get(f"/api/messages/{solve.get_attribute('data-id')}").json()["source"] == \
        "Write a Python function add(a, b) that returns a + b."
    expect(first.locator(".exec-count")).to_have_text("[1]")  # and no "r" in it ran the cells above
    expect(solve.locator(".loop summary")).to_contain_text("Solve", timeout=60_000)
    assert solve.locator(".loop .attempts li").count() >= 1
    solve.locator(".loop summary").focus()
    kb.press("Enter")  # open the attempts
    expect(solve.locator(".loop .attempts li").first).to_be_visible()
    kb.press("Escape")  # from the summary back to command mode on its cell
    assert focus_is_command_mode(page)
    page.evaluate("window.scrollTo(0, 0)")
    shot(page, "02-solved")
    n_cells = page.locator("#cells > article.cell").count()

    # Export as .ipynb from the header, with the keyboard: Shift+Tab from the first cell reaches it.
    kb.press("Home")
    for _ in range(12):
        if page.evaluate("document.activeElement.matches('details.export > summary')"):
            break
        kb.press("Shift+Tab")
    kb.press("Enter")
    kb.press("Tab")
    assert page.evaluate("document.activeElement.matches('a.export-ipynb')")
    with page.expect_download() as download:
        kb.press("Enter")
    path = tmp_path / "session.ipynb"
    download.value.save_as(path)
    nb = json.loads(path.read_text())
    assert nb["nbformat"] == 4 and len(nb["cells"]) == n_cells

    # Re-import it through the home page's form.
    page.goto(f"{server.base}/")
    page.locator("form.import input[type=file]").set_input_files(str(path))
    page.locator("form.import button").press("Enter")
    page.wait_for_url("**/d/*")
    assert page.url.rsplit("/", 1)[1] != did
    until(page, "!!document.querySelector('article.cell.selected')")
    expect(page.locator("#cells > article.cell")).to_have_count(n_cells)
    expect(cell(page, 0).locator(".outputs")).to_contain_text("hello 42")
    expect(cell(page, 1).locator(".md-view h1")).to_have_text("Findings")
    assert cell(page, 2).get_attribute("data-type") == "prompt"
    expect(cell(page, 2).locator(".reply .md")).not_to_be_empty()
    shot(page, "03-reimported")

    # Back to the first dialog: 0 0 restarts its kernel, and the execution count starts again.
    page.goto(f"{server.base}/d/{did}")
    until(page, "!!document.querySelector('article.cell.selected')")
    kb.press("Control+Enter")  # Solve ran code in this kernel too, so the count is past [1]
    until(page, "document.querySelector('#cells .exec-count').textContent !== '[1]'")
    kb.press("0")
    kb.press("0")
    expect(page.locator("#kernel-state")).to_have_text("kernel: idle", timeout=60_000)
    expect(page.locator("#toast")).to_contain_text("Kernel restarted")
    kb.press("Control+Enter")
    expect(cell(page, 0).locator(".exec-count")).to_have_text("[1]", timeout=30_000)


def ids(page) -> list[str]:
    return page.evaluate("[...document.querySelectorAll('#cells > article.cell')].map(c => c.dataset.id)")


def types(page) -> list[str]:
    return page.evaluate("[...document.querySelectorAll('#cells > article.cell')].map(c => c.dataset.type)")


def mark_all(page):
    """Tag every cell element, to tell later which ones were swapped."""
    page.evaluate("document.querySelectorAll('#cells > article.cell').forEach(c => c.__kept = true)")


def kept(page) -> list[bool]:
    return page.evaluate("[...document.querySelectorAll('#cells > article.cell')].map(c => !!c.__kept)")


def test_cell_commands_from_the_keyboard(watched, server, api):
    page, kb = watched.page, watched.page.keyboard
    did = open_dialog(watched, server, api, "Commands", [
        {"type": "code", "source": "a = 1"}, {"type": "note", "source": "first note"},
        {"type": "code", "source": "print('b is', a + 1)"}])
    first, note, last = ids(page)
    assert selected_id(page) == first and focus_is_command_mode(page)

    # Selection: j / k / arrows; r runs all code above; Ctrl+Enter runs in place.
    kb.press("j")
    kb.press("ArrowDown")
    until(page, f"document.querySelector('article.cell.selected').dataset.id === '{last}'")
    kb.press("r")
    expect(page.locator(f"#cell-{first} .exec-count")).to_have_text("[1]")
    mark_all(page)
    kb.press("Control+Enter")
    expect(page.locator(f"#cell-{last} .outputs")).to_have_text("b is 2")
    # Only the cell that ran was swapped; the others are the same elements.
    assert kept(page) == [True, True, False]
    assert selected_id(page) == last and focus_is_command_mode(page)

    # a / b add above and below; y m p change the type.
    kb.press("k")
    kb.press("b")
    expect(page.locator("#cells > article.cell")).to_have_count(4)
    new = ids(page)[2]
    assert selected_id(page) == new
    kb.press("p")
    expect(page.locator(f"#cell-{new}")).to_have_attribute("data-type", "prompt")
    kb.press("m")
    expect(page.locator(f"#cell-{new}")).to_have_attribute("data-type", "note")
    kb.press("y")
    expect(page.locator(f"#cell-{new}")).to_have_attribute("data-type", "code")
    kb.press("a")
    expect(page.locator("#cells > article.cell")).to_have_count(5)
    assert ids(page).index(selected_id(page)) == 2

    # d d deletes, z brings it back with its source, type and outputs.
    kb.press("Home")
    kb.press("j")
    kb.press("j")
    kb.press("j")
    kb.press("j")
    until(page, f"document.querySelector('article.cell.selected').dataset.id === '{last}'")
    kb.press("d")
    kb.press("d")
    expect(page.locator("#cells > article.cell")).to_have_count(4)
    assert last not in ids(page)
    kb.press("z")
    expect(page.locator("#cells > article.cell")).to_have_count(5)
    restored = selected_id(page)
    assert ids(page)[-1] == restored
    expect(page.locator(f"#cell-{restored} .outputs")).to_have_text("b is 2")
    expect(page.locator(f"#cell-{restored} .exec-count")).to_have_text("[2]")
    m = api.get(f"/api/messages/{restored}").json()
    assert m["source"] == "print('b is', a + 1)" and m["type"] == "code" and m["outputs"]

    # c v copies below; x cuts, v pastes.
    kb.press("Home")
    kb.press("c")
    kb.press("End")
    kb.press("v")
    expect(page.locator("#cells > article.cell")).to_have_count(6)
    assert api.get(f"/api/messages/{ids(page)[-1]}").json()["source"] == "a = 1"
    kb.press("Home")
    kb.press("x")
    expect(page.locator("#cells > article.cell")).to_have_count(5)
    kb.press("v")
    expect(page.locator("#cells > article.cell")).to_have_count(6)
    assert api.get(f"/api/messages/{ids(page)[1]}").json()["source"] == "a = 1"

    # Ctrl+Shift+Up / Down move the cell; nothing else is re-rendered.
    order = ids(page)
    kb.press("End")
    mark_all(page)
    kb.press("Control+Shift+ArrowUp")
    until(page, f"document.querySelectorAll('#cells > article.cell')[4].dataset.id === '{order[-1]}'")
    assert ids(page) == order[:4] + [order[5], order[4]]
    assert all(kept(page)), "a move re-rendered cells"
    assert [m["id"] for m in api.get(f"/api/dialogs/{did}").json()["messages"]] == [int(i) for i in ids(page)]
    kb.press("Control+Shift+ArrowDown")
    until(page, f"document.querySelectorAll('#cells > article.cell')[5].dataset.id === '{order[-1]}'")
    assert focus_is_command_mode(page) and selected_id(page) == order[-1]

    # Shift+P and Shift+S pin and skip.
    kb.press("Shift+P")
    expect(page.locator(f"#cell-{order[-1]}")).to_have_class(re.compile(r"\bpinned\b"))
    kb.press("Shift+S")
    expect(page.locator(f"#cell-{order[-1]}")).to_have_class(re.compile(r"\bskipped\b"))
    msg = api.get(f"/api/messages/{order[-1]}").json()
    assert msg["pinned"] and msg["skipped"]

    # ? shows the keys; Esc closes them.
    kb.press("?")
    expect(page.locator("#keys-help")).to_be_visible()
    expect(page.locator("#keys-help")).to_contain_text("restart the kernel")
    shot(page, "04-keys")
    kb.press("Escape")
    expect(page.locator("#keys-help")).to_be_hidden()
    assert focus_is_command_mode(page)


def test_runs_queue_in_order_and_i_i_interrupts(watched, server, api):
    page, kb = watched.page, watched.page.keyboard
    open_dialog(watched, server, api, "Queue", [
        {"type": "code", "source": "import time\nprint('slow start', flush=True)\ntime.sleep(30)"},
        {"type": "code", "source": "print('never runs')"},
        {"type": "code", "source": "print('after')"}])
    slow, queued, after = ids(page)
    kb.press("Shift+Enter")
    kb.press("Shift+Enter")
    expect(page.locator(f"#cell-{slow}")).to_have_class(re.compile(r"\brunning\b"))
    expect(page.locator(f"#cell-{queued}")).to_have_class(re.compile(r"\bqueued\b"))
    # Jupyter's [*] on both (drawn by CSS over the hidden count).
    for cid in (slow, queued):
        assert page.evaluate(f"getComputedStyle(document.querySelector('#cell-{cid} .exec-count'), '::after')"
                             ".content") == '"[*]"'

    expect(page.locator("#kernel-state")).to_have_text("kernel: busy")
    shot(page, "05-running-and-queued")
    kb.press("i")
    kb.press("i")
    expect(page.locator(f"#cell-{slow} .outputs")).to_contain_text("KeyboardInterrupt", timeout=30_000)
    # The queue was dropped with the interrupt, as in Jupyter.
    expect(page.locator(f"#cell-{queued}")).not_to_have_class(re.compile(r"\bqueued\b"))
    expect(page.locator(f"#cell-{queued} .outputs")).to_be_empty()
    expect(page.locator("#kernel-state")).to_have_text("kernel: idle")
    # Alt+Enter runs and adds a cell below, in edit mode.
    kb.press("End")
    kb.press("Alt+Enter")
    expect(page.locator(f"#cell-{after} .outputs")).to_have_text("after")
    expect(page.locator("#cells > article.cell")).to_have_count(4)
    until(page, "document.activeElement.closest('article.cell') === document.querySelectorAll('#cells > article.cell')[3]")


PNG_1PX = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==")


def test_outputs_render_safely_and_long_ones_collapse(watched, server, api):
    page, kb = watched.page, watched.page.keyboard
    open_dialog(watched, server, api, "Outputs", [
        {"type": "code", "source": "for i in range(300):\n    print('line', i)"},
        {"type": "code", "source": "print('\\x1b[31mred\\x1b[0m and <b>not bold</b>')"},
        {"type": "code", "source": "from IPython.display import display, Markdown, HTML\n"
                                   f"display({{'image/png': '{PNG_1PX}'}}, raw=True)\n"
                                   "display(Markdown('**strong** text'))\n"
                                   "display(HTML('<table><tr><td>cell</td></tr></table>'))"}])
    long, ansi, rich = ids(page)
    kb.press("Shift+Enter")
    kb.press("Shift+Enter")
    kb.press("Shift+Enter")
    wait_idle(page)
    # 300 lines: the head shows, with a button that fetches the rest.
    out = page.locator(f"#cell-{long} .outputs")
    expect(out.locator(".show-all")).to_contain_text("Show all 300 lines")
    assert "line 19" in out.inner_text() and "line 20" not in out.inner_text()
    page.evaluate("window.scrollTo(0, document.body.scrollHeight)")
    shot(page, "06-outputs")
    out.locator(".show-all").click()
    expect(out).to_contain_text("line 299")
    expect(out.locator(".show-all")).to_have_count(0)
    # ANSI colours as classes, markup as text.
    expect(page.locator(f"#cell-{ansi} .outputs span.ansi31")).to_have_text("red")
    expect(page.locator(f"#cell-{ansi} .outputs")).to_contain_text("<b>not bold</b>")
    assert page.locator(f"#cell-{ansi} .outputs b").count() == 0
    # An image inline, markdown rendered, HTML in a sandboxed frame.
    rich_out = page.locator(f"#cell-{rich} .outputs")
    assert rich_out.locator("img").get_attribute("src").startswith("data:image/png;base64,")
    expect(rich_out.locator(".out-markdown strong")).to_have_text("strong")
    frame = rich_out.locator("iframe.out-html")
    assert "allow-same-origin" not in frame.get_attribute("sandbox")
    expect(page.frame_locator(f"#cell-{rich} iframe.out-html").locator("td")).to_have_text("cell")


def tab_to(page, selector: str, key: str = "Shift+Tab", limit: int = 25):
    """Move the focus with Tab (or Shift+Tab) until it is on `selector`."""
    for _ in range(limit):
        if page.evaluate(f"document.activeElement.matches({selector!r})"):
            return
        page.keyboard.press(key)
    raise AssertionError(f"{key} never reached {selector}")


def test_rename_duplicate_search_and_delete(watched, server, api):
    page, kb = watched.page, watched.page.keyboard
    did = open_dialog(watched, server, api, "Draft", [{"type": "code", "source": "x = 1"}])
    # Rename: from the first cell, Shift+Tab reaches the title; type and press Enter.
    kb.press("Home")
    tab_to(page, "input.dialog-title")
    kb.press("Control+A")
    kb.type("Renamed by keyboard")
    kb.press("Enter")
    until(page, "document.title.startsWith('Renamed by keyboard')")
    assert api.get(f"/api/dialogs/{did}").json()["title"] == "Renamed by keyboard"
    assert page.url.endswith(f"/d/{did}")
    # Duplicate: a branch of the dialog opens.
    page.locator("article.cell").first.focus()
    tab_to(page, "button.duplicate")
    kb.press("Enter")
    page.wait_for_url(lambda url: not url.endswith(f"/d/{did}"))
    copy = page.url.rsplit("/", 1)[1]
    expect(page.locator("#cells > article.cell")).to_have_count(1)
    assert api.get(f"/api/dialogs/{copy}").json()["messages"][0]["source"] == "x = 1"
    # Search by title on the home page: / focuses the search box.
    page.goto(f"{server.base}/")
    until(page, "document.activeElement.matches('form.new-dialog input')")  # autofocus
    kb.press("Tab")  # off the new-dialog title, so / is a key, not a character
    kb.press("/")
    assert page.evaluate("document.activeElement.matches('form.search input')")
    kb.type("Renamed by")
    kb.press("Enter")
    page.wait_for_url("**/?q=*")
    rows = page.locator(".dialog-list li")
    expect(rows).to_have_count(2)
    # Delete, with a confirmation.
    asked = []
    page.on("dialog", lambda d: (asked.append(d.message), d.accept()))
    rows.first.locator("button.delete").focus()
    kb.press("Enter")
    expect(rows).to_have_count(1)
    assert asked and "cannot be undone" in asked[0]
    assert len([d for d in api.get("/api/dialogs").json() if d["title"].startswith("Renamed by")]) == 1


def test_a_long_dialog_makes_editors_as_they_near_the_screen(watched, server, api):
    page, kb = watched.page, watched.page.keyboard
    cells = [{"cell_type": "code", "metadata": {}, "execution_count": None, "outputs": [], "source": f"n = {i}"}
             for i in range(150)]
    nb = {"nbformat": 4, "nbformat_minor": 5, "metadata": {}, "cells": cells[:-1]}
    did = api.post("/api/dialogs/import", content=json.dumps(nb).encode()).json()["id"]
    prompt = api.post(f"/api/dialogs/{did}/messages", json={"type": "prompt", "source": "Split it"}).json()["id"]
    api.patch(f"/api/messages/{prompt}", json={"reply": "Like this:\n\n```python\nprint('from the reply')\n```\n"})
    page.goto(f"{server.base}/d/{did}")
    until(page, "!!document.querySelector('article.cell.selected')")
    made = page.evaluate("document.querySelectorAll('.cm-editor').length")
    assert 0 < made < 150, made
    # End, then Enter: the last code cell gets its editor when it is edited.
    kb.press("End")
    kb.press("k")
    kb.press("Enter")
    until(page, "document.activeElement.closest('.cm-editor') !== null")
    kb.type(" + 1")
    kb.press("Escape")
    until(page, "loopbook.page.selected().querySelector('textarea').value === 'n = 148 + 1'")
    kb.press("Control+Enter")
    wait_idle(page)
    assert api.get(f"/api/dialogs/{did}").json()["messages"][-2]["source"] == "n = 148 + 1"
    # The reply's code becomes cells under the prompt ("Code to cells").
    kb.press("j")
    page.locator("article.cell.selected .extract").click()
    expect(page.locator("#cells > article.cell")).to_have_count(151)
    last = page.locator("#cells > article.cell").last
    expect(last).to_have_attribute("data-type", "code")
    assert api.get(f"/api/messages/{last.get_attribute('data-id')}").json()["source"] == "print('from the reply')"
