"""The browser's side of the promises, in a real Chromium: output frames, framing, cross-site forms."""

import http.server
import threading
import time

import pytest

from apphelpers import TOKEN
from parts import require, require_module

pytestmark = pytest.mark.browser

require("chromium")
sync_api = require_module("playwright.sync_api")

# What an output could try from inside its frame: inline script, our own htmx as a gadget, plain requests.
HOSTILE_HTML = """<p id="inside">inside the frame</p>
<script>document.getElementById('inside').textContent = 'inline script ran'; parent.document.title = 'pwned';</script>
<script src="/static/vendor/htmx.min.js"></script>
<div hx-post="/api/dialogs" hx-vals='{"title": "gadget-post"}' hx-trigger="load"></div>
<div id="leak" hx-get="/api/dialogs" hx-trigger="load" hx-swap="innerHTML">nothing leaked</div>
<form method="post" action="/dialogs"><input name="title" value="frame-form"><button id="go">go</button></form>
<a id="top" href="/api/dialogs" target="_top">top</a>"""


@pytest.fixture
def evil_site():
    """Another origin on this machine (same site as Loopbook: only the port differs), serving given pages."""
    pages = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = pages.get(self.path, "").encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", pages
    srv.shutdown()


def logged_in(browser, server):
    context = browser.new_context()
    page = context.new_page()
    page.goto(f"{server.base}/?token={TOKEN}")
    assert page.url.rstrip("/") == server.base  # the token left the URL; the cookie stays
    return context, page


def wait_for(page, check, what: str, timeout: float = 20.0) -> None:
    """Wait until check() is true, pumping the page's events (console messages arrive while Playwright waits)."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"no sign of {what} in {timeout} s"
        page.wait_for_timeout(50)


def titles(c):
    return [d["title"] for d in c.get("/api/dialogs").json()]


def test_html_output_frames_render_but_cannot_reach_the_app(browser, server, c):
    did = c.post("/api/dialogs", json={"title": "read me if you can"}).json()["id"]
    code = f"from IPython.display import HTML, display\ndisplay(HTML({HOSTILE_HTML!r}))"
    mid = c.post(f"/api/dialogs/{did}/messages", json={"type": "code", "source": code}).json()["id"]
    assert c.post(f"/api/messages/{mid}/run").json()["status"] == "ok"
    context, page = logged_in(browser, server)
    console = []
    page.on("console", lambda m: console.append(m.text))
    page.goto(f"{server.base}/d/{did}")
    page.wait_for_selector("iframe.out-html")
    frame = page.frame_locator("iframe.out-html")
    frame.locator("#inside").wait_for()
    inner = page.frames[1]
    # The frame's load event: every script in it would have run by now, and htmx's load triggers fired. And
    # Chromium said, once per <script>, that it refused to run it: the refusal is the event waited for.
    inner.wait_for_load_state("load")
    wait_for(page, lambda: sum("Blocked script execution in 'about:srcdoc'" in m for m in console) == 2,
             "Chromium refusing the frame's two scripts")
    assert inner.evaluate("document.getElementById('inside').textContent") == "inside the frame"
    assert inner.evaluate("typeof window.htmx") == "undefined"  # not even our own script runs in there
    assert inner.evaluate("document.getElementById('leak').textContent") == "nothing leaked"
    assert page.title() != "pwned"
    assert not any("frame-src" in m or "Refused to frame" in m for m in console), console
    # Clicking its form or its link does nothing either: no forms, no top navigation from the sandbox. Each
    # click is followed by Chromium's refusal, so the check after it runs once the click has been handled.
    with page.expect_console_message(lambda m: "Blocked form submission" in m.text and "allow-forms" in m.text):
        frame.locator("#go").click()
    with page.expect_console_message(lambda m: "allow-top-navigation" in m.text):
        frame.locator("#top").click()
    assert page.url == f"{server.base}/d/{did}"
    assert not {"gadget-post", "frame-form"} & set(titles(c))
    context.close()


def test_another_origin_cannot_frame_or_post_to_loopbook(browser, server, c, evil_site):
    evil, pages = evil_site
    pages["/frame"] = f'<iframe id="f" src="{server.base}/"></iframe>'
    pages["/csrf"] = f"""<form id="f" method="post" action="{server.base}/dialogs">
        <input name="title" value="csrf-form"></form>
        <script>
          (async () => {{
            // One after another, each finished before the next: the POST has reached the server (or not) and
            // the read has failed (or not) before the page says which, then submits the form.
            await fetch("{server.base}/api/dialogs", {{method: "POST", mode: "no-cors", credentials: "include",
              headers: {{"Content-Type": "text/plain"}}, body: JSON.stringify({{title: "csrf-fetch"}})}}).catch(() => null);
            let verdict;
            try {{
              const r = await fetch("{server.base}/api/dialogs", {{credentials: "include"}});
              verdict = "read:" + await r.text();
            }} catch (e) {{
              verdict = "blocked";
            }}
            console.log("csrf-verdict " + verdict);
            document.getElementById("f").submit();
          }})();
        </script>"""
    context, page = logged_in(browser, server)
    # Chromium says why the frame stays empty (frame-ancestors 'none' / X-Frame-Options: DENY), and shows its
    # error page in it.
    with page.expect_console_message(lambda m: "frame-ancestors 'none'" in m.text or "X-Frame-Options" in m.text):
        page.goto(f"{evil}/frame")
    framed = page.frames[1]
    assert framed.url.startswith("chrome-error://") and "Loopbook" not in framed.content()
    probe = context.new_page()
    with probe.expect_console_message(lambda m: m.text.startswith("csrf-verdict ")) as verdict:
        probe.goto(f"{evil}/csrf")
    assert verdict.value.text == "csrf-verdict blocked"  # no CORS: the evil page cannot read the answer
    probe.wait_for_url(f"{server.base}/dialogs")  # the form's POST went...
    assert "Cross-site request refused" in probe.content()  # ...and landed on our 403
    assert not {"csrf-form", "csrf-fetch"} & set(titles(c))
    context.close()
