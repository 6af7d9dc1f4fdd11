"""What reaches the page: security headers, the CSP, and a table of XSS payloads through every way in."""

import json
import re
import sqlite3
from urllib.parse import quote

import httpx
import pytest

from securityhelpers import OUR_SCRIPTS, Audit, sse_events

# Each payload carries its own marker (XSS<n>) so a test can see that it landed, and where.
PAYLOADS = [
    "<script>alert('XSS1')</script>",
    "<img src=x onerror=alert('XSS2')>",
    "<svg onload=alert('XSS3')>",
    "<svg><script>alert('XSS4')</script></svg>",
    "\"><script>alert('XSS5')</script>",
    "'><img src=x onerror=alert('XSS6')>",
    "</textarea><script>alert('XSS7')</script>",
    "</title><script>alert('XSS8')</script>",
    "<iframe src=\"javascript:alert('XSS9')\"></iframe>",
    "<a href=\"javascript:alert('XSS10')\">click</a>",
    "[click](javascript:alert('XSS11'))",
    "![img](javascript:alert('XSS12'))",
    "<a href=\"JaVaScRiPt:alert('XSS13')\">x</a>",
    "<a href=\"&#106;avascript:alert('XSS14')\">x</a>",
    "<a href=\"java&#9;script:alert('XSS15')\">x</a>",
    "<body onload=alert('XSS16')>",
    "<details open ontoggle=alert('XSS17')>x</details>",
    "<input autofocus onfocus=alert('XSS18')>",
    "<object data=\"javascript:alert('XSS19')\"></object>",
    "<embed src=\"javascript:alert('XSS20')\">",
    "<base href=\"javascript:alert('XSS21')//\">",
    "<meta http-equiv=\"refresh\" content=\"0;url=javascript:alert('XSS22')\">",
    "<math><mtext><table><mglyph><style><img src=x onerror=alert('XSS23')>",
    "<noscript><p title=\"</noscript><img src=x onerror=alert('XSS24')>\">",
    "<style>@import 'http://evil.example/XSS25.css';</style>",
    "<div style=\"background:url(javascript:alert('XSS26'))\">x</div>",
    "<form action=\"javascript:alert('XSS27')\"><button>x</button></form>",
    "<button formaction=\"javascript:alert('XSS28')\">x</button>",
    "<div hx-post=\"/api/dialogs?XSS29\" hx-trigger=\"load\">x</div>",
    "<div hx-on:click=\"alert('XSS30')\">x</div>",
    "<div hx-ext=\"sse\" sse-connect=\"/cells/1/stream?XSS31\">x</div>",
    "<img src=\"data:text/html,<script>alert('XSS32')</script>\">",
    "<a href=\"data:text/html;base64,PHNjcmlwdD5hbGVydCgnWFNTMzMnKTwvc2NyaXB0Pg==\">XSS33</a>",
    "<scr<script>ipt>alert('XSS34')</script>",
    "<<script>alert('XSS35');//<</script>",
    "<svg><a xlink:href=\"javascript:alert('XSS36')\"><text>x</text></a></svg>",
    "\x1b]8;;javascript:alert('XSS37')\x1b\\link\x1b]8;;\x1b\\",
    "\x1b[31m<script>alert('XSS38')</script>\x1b[0m",
    "<template><script>alert('XSS39')</script></template>",
    "<link rel=stylesheet href=\"http://evil.example/XSS40.css\">",
    "<!--<img src=\"--><img src=x onerror=alert('XSS41')//\">",
    "<a href=\"vbscript:msgbox('XSS42')\">x</a>",
    "<video><source onerror=\"alert('XSS43')\"></video>",
    "\u202e<script>alert('XSS44')</script>\u202d",
    "<img srcset=\"javascript:alert('XSS45') 1x\">",
    "`<script>alert('XSS46')</script>` and ```\n<script>alert('XSS46')</script>\n```",
]


def marker(payload: str) -> str:
    return re.search(r"XSS\d+", payload).group(0)


def audit(html: str, where: str) -> Audit:
    a = Audit(html)
    assert not a.findings, f"{where}: {a.findings[:5]}"
    return a


# -- headers ---------------------------------------------------------------------------------------------

def csp_of(r) -> dict[str, list[str]]:
    policy = {}
    for part in r.headers["content-security-policy"].split(";"):
        name, *values = part.split()
        policy[name] = values
    return policy


def test_security_headers_on_every_kind_of_answer(server, c):
    did = c.post("/api/dialogs", json={"title": "headers"}).json()["id"]
    answers = [c.get(f"/d/{did}"), c.get("/api/dialogs"), c.get("/static/app.css"), c.get("/ansi.css"),
               c.get("/no/such/page"), c.get("/api/dialogs/999999"), httpx.get(server.base + "/"),
               c.get("/api/dialogs", headers={"Host": "evil.example"}),
               c.post("/api/dialogs", content=b"x" * 10, headers={"Origin": "http://evil.example"})]
    with c.stream("GET", f"/cells/{did}/stream") as sse:
        answers.append(sse)
    for r in answers:
        h = r.headers
        assert h["x-content-type-options"] == "nosniff", r.url
        assert h["x-frame-options"] == "DENY" and h["referrer-policy"] == "no-referrer"
        assert h["cross-origin-opener-policy"] == "same-origin"
        policy = csp_of(r)
        assert policy["frame-ancestors"] == ["'none'"] and policy["default-src"] == ["'self'"]
        assert h.get_list("content-security-policy") == [h["content-security-policy"]]  # one policy, not two


def test_csp_allows_only_what_the_page_needs(server, c):
    did = c.post("/api/dialogs", json={"title": "csp"}).json()["id"]
    m = c.post(f"/api/dialogs/{did}/messages", json={"type": "code", "source": "from IPython.display import HTML, "
                                                   "display\ndisplay(HTML('<b>bold</b>'))\nprint('\\x1b[31mred')"})
    c.post(f"/api/messages/{m.json()['id']}/run")
    r = c.get(f"/d/{did}")
    policy = csp_of(r)
    for directive, values in policy.items():
        assert "'unsafe-inline'" not in values and "'unsafe-eval'" not in values and "*" not in values, directive
        assert not any(v.startswith(("http:", "https:")) for v in values), directive
    assert policy["script-src"] == ["'self'"] and policy["object-src"] == ["'none'"]
    assert policy["base-uri"] == ["'none'"] and policy["connect-src"] == ["'self'"]
    a = audit(r.text, "dialog page")
    # Every script is one of ours, from our origin; nothing inline, so script-src 'self' is enough.
    assert OUR_SCRIPTS <= set(a.scripts) and all(src.startswith("/static/") for src in a.scripts)
    # HTML outputs are srcdoc frames (about:srcdoc): frame-src must allow about:, and nothing needs more.
    assert a.iframes and all("srcdoc" in f and "src" not in f for f in a.iframes)
    assert policy["frame-src"] == ["about:"]
    # The sandbox gives the frame an opaque origin and no scripts: srcdoc frames inherit this CSP anyway,
    # and a frame that may run script could load our own /static scripts as gadgets.
    assert all(f["sandbox"].split() == [] for f in a.iframes)
    # Images are data: URLs (outputs) or our own files; img-src allows exactly that.
    assert policy["img-src"] == ["'self'", "data:"]
    # Colours come from classes (ansi.css), so style-src needs no 'unsafe-inline'.
    assert policy["style-src"] == ["'self'"] and 'class="ansi31"' in r.text


# -- XSS: every way content reaches the page ------------------------------------------------------------

def run(c, did, code):
    mid = c.post(f"/api/dialogs/{did}/messages", json={"type": "code", "source": code}).json()["id"]
    res = c.post(f"/api/messages/{mid}/run")
    assert res.status_code == 200, res.text
    return mid, res.json()


KERNEL_CODE = """\
from IPython.display import display
import sys
p = {p!r}
print(p)
print(p, file=sys.stderr)
display({{'text/plain': p}}, raw=True)
display({{'text/markdown': p}}, raw=True)
display({{'text/html': p, 'text/plain': 'html'}}, raw=True)
display({{'image/svg+xml': p}}, raw=True)
display({{'image/png': p}}, raw=True)
display({{'application/javascript': p, 'text/plain': 'js'}}, raw=True)
class R:
    def __repr__(self):
        return p
get_ipython().displayhook(R())
E = type('E', (Exception,), {{}})
E.__name__ = E.__qualname__ = p
raise E(p)
"""


@pytest.fixture(scope="module")
def xss_dialogs(server):
    """Per payload: a dialog titled with it, holding it as code, note, prompt and model reply; and one dialog
    (one kernel) whose code cells send it back as every kind of output."""
    with server.client() as c:
        dialogs = []
        for p in PAYLOADS:
            did = c.post("/api/dialogs", json={"title": p}).json()["id"]
            for type_ in ("code", "note", "prompt"):
                prompt = c.post(f"/api/dialogs/{did}/messages", json={"type": type_, "source": p}).json()["id"]
            c.patch(f"/api/messages/{prompt}", json={"reply": p})  # a model reply is rendered as markdown
            dialogs.append((p, did, prompt))
        kernel_dialog = c.post("/api/dialogs", json={"title": "kernel outputs"}).json()["id"]
        code_cells = []
        for p in PAYLOADS:
            code_id, res = run(c, kernel_dialog, KERNEL_CODE.format(p=p))
            assert res["status"] == "error", res
            kinds = {o["output_type"] for o in res["outputs"]}
            assert kinds == {"stream", "display_data", "execute_result", "error"}, kinds
            assert res["outputs"][-1]["ename"] == p
            code_cells.append((p, code_id))
        return dialogs, kernel_dialog, code_cells


def test_payloads_through_the_pages(server, c, xss_dialogs):
    dialogs, kernel_dialog, code_cells = xss_dialogs
    html = c.get("/").text
    audit(html, "home page")
    for p, did, prompt in dialogs:
        assert marker(p) in html
        page = c.get(f"/d/{did}").text
        audit(page, f"dialog page of {p!r}")
        assert page.count(marker(p)) >= 3  # title, sources, reply: it landed, as text
        done = [d for e, d in sse_events(c.get(f"/cells/{prompt}/stream").text) if e == "done"]
        assert done, p
        audit(done[0], f"reply stream of {p!r}")
        done = [d for e, d in sse_events(c.get(f"/cells/{prompt}/loop-stream").text) if e == "done"]
        audit(done[0], f"loop stream of {p!r}")
        for fmt in ("md", "py", "ipynb"):
            r = c.get(f"/d/{did}/export.{fmt}")
            assert r.status_code == 200 and "text/html" not in r.headers["content-type"]
            assert "attachment" in r.headers["content-disposition"] and "/" not in r.headers["content-disposition"]
    page = c.get(f"/d/{kernel_dialog}").text
    a = audit(page, "kernel outputs")
    for p, code_id in code_cells:
        assert marker(p) in page
        # text/html lands in a sandboxed srcdoc frame, nowhere else.
        assert any(marker(p) in f.get("srcdoc", "") for f in a.iframes), p
        for n in range(len(c.get(f"/api/messages/{code_id}").json()["outputs"])):
            r = c.get(f"/cells/{code_id}/output/{n}")
            assert r.status_code == 200
            audit(r.text, f"output {n} of {p!r}")


def test_payloads_in_error_messages(server, c):
    """Error pages and toasts quote what was sent; none of it may become markup."""
    did = c.post("/api/dialogs", json={"title": "toasts"}).json()["id"]
    cell = c.post(f"/api/dialogs/{did}/messages", json={"type": "code"}).json()["id"]
    for p in PAYLOADS:
        q = quote(p, safe="")
        answers = [c.get(f"/d/{q}"), c.get(f"/traces/{q}"), c.get(f"/d/{q}/kernel"),
                   c.post(f"/cells/{q}/toggle", data={"field": "pinned"}, headers={"HX-Request": "true"}),
                   c.post(f"/cells/{cell}/type", data={"type": p}, headers={"HX-Request": "true"}),
                   c.post(f"/d/{did}/rename", data={"title": p * 20}, headers={"HX-Request": "true"}),
                   c.post(f"/d/{did}/cells", data={"type": p}, headers={"HX-Request": "true"}),
                   c.post("/dialogs", data={"title": p * 20}),
                   c.get(f"/nope/{q}", headers={"Accept": "text/html"})]
        for r in answers:
            assert r.status_code < 500, (r.url, r.status_code)
            if "html" in r.headers.get("content-type", ""):
                audit(r.text, f"error answer {r.url}")
        toast = answers[4]  # "Message type must be one of ...; got '<payload>'" in the page's toast area
        assert toast.headers["hx-retarget"] == "#toast" and 'class="toast-msg"' in toast.text
        assert marker(p) in toast.text


def test_payloads_in_an_imported_notebook(server, c):
    cells = []
    for p in PAYLOADS:
        cells.append({"cell_type": "markdown", "metadata": {}, "source": p + " ![att](attachment:a.png)",
                      "attachments": {"a.png": {"image/png": p}}})
        cells.append({"cell_type": "raw", "metadata": {}, "source": p})
        cells.append({"cell_type": "code", "metadata": {}, "execution_count": 1, "source": p, "outputs": [
            {"output_type": "stream", "name": "stdout", "text": p},
            {"output_type": "display_data", "metadata": {}, "data": {
                "text/html": p, "text/markdown": p, "application/javascript": p, "text/plain": p}},
            {"output_type": "display_data", "metadata": {}, "data": {"application/javascript": p, "text/plain": p}},
            {"output_type": "display_data", "metadata": {}, "data": {"text/markdown": [p, "\n", p]}},
            {"output_type": "display_data", "metadata": {}, "data": {"image/svg+xml": p}},
            {"output_type": "display_data", "metadata": {}, "data": {"image/png": p}},
            {"output_type": "execute_result", "execution_count": 1, "metadata": {}, "data": {"text/plain": p}},
            {"output_type": "error", "ename": p, "evalue": p, "traceback": [p, "\x1b[31m" + p]}]})
    nb = {"nbformat": 4, "nbformat_minor": 5, "metadata": {"title": PAYLOADS[0]}, "cells": cells}
    r = c.post("/api/dialogs/import", content=json.dumps(nb).encode(), params={"title": PAYLOADS[1]})
    assert r.status_code == 200, r.text
    did = r.json()["id"]
    page = c.get(f"/d/{did}").text
    a = audit(page, "imported notebook")
    for p in PAYLOADS:
        assert marker(p) in page
    assert sum(1 for f in a.iframes if "XSS" in f.get("srcdoc", "")) >= len(PAYLOADS)
    assert r.json()["title"] == PAYLOADS[1]
    # The same file through the upload form.
    r = c.post("/dialogs/import", files={"file": (PAYLOADS[0] + ".ipynb", json.dumps(nb).encode(), "application/json")},
               follow_redirects=True)
    assert r.status_code == 200
    audit(r.text, "uploaded notebook")


def test_payloads_on_the_trace_page(server, c):
    """A trace holds model text, code, tracebacks, stdout and checks: all of it shows on the trace page."""
    from dialog import Store
    from execfeedback.traces import TraceStore

    did = c.post("/api/dialogs", json={"title": "traces"}).json()["id"]
    mid = c.post(f"/api/dialogs/{did}/messages", json={"type": "prompt", "source": "solve it"}).json()["id"]
    store = Store(server.data_dir)  # a second writer on the live store: the server's own writes wait their turn
    try:
        traces = TraceStore(store)
        tid = traces.start_trace("solve", dialog_id=did, message_id=mid, model=PAYLOADS[0], backend=PAYLOADS[1],
                                 manifest={"model": PAYLOADS[2]}, task_source=PAYLOADS[3])
        for n, p in enumerate(PAYLOADS):
            traces.add_attempt(tid, [{"role": "system", "content": p}, {"role": "user", "content": [{"type": "text",
                                                                                                   "text": p}]}],
                               round=n, candidate=0, completion=p, code=p, extracted=True, exec_status="error",
                               passed=False, ename=p, evalue=p, traceback=[p, "\x1b[31m" + p], stdout=p, stderr=p,
                               checks={"failed": [p]}, locals={"x": p}, feedback=p, author="model")
        traces.finish_trace(tid, status="failed", stop_reason="budget")
    finally:
        store.close()
    page = c.get(f"/traces/{tid}").text
    audit(page, "trace page")
    for p in PAYLOADS:
        assert marker(p) in page
    dialog_page = c.get(f"/d/{did}").text  # the attempt lines under the prompt
    audit(dialog_page, "attempt lines")
    assert "XSS45" in dialog_page


# -- hostile notebooks: Loopbook's own metadata is input like any other ------------------------------------------

def loopbook_notebook(code_meta=None, reply_meta=None, settings=None, **cell):
    """A notebook as Loopbook exports one (a code cell and a prompt with its reply), its metadata replaced."""
    code = {"cell_type": "code", "metadata": {"loopbook": {"type": "code", "output_meta": code_meta or {}}},
            "execution_count": 1, "source": "print(1)", "outputs": [], **cell}
    prompt = {"cell_type": "markdown", "source": "> **Prompt**\n>\n> q\n\n**Reply**\n\nan answer",
              "metadata": {"loopbook": {"type": "prompt", "prompt": "q", "reply": "an answer",
                                        "reply_meta": reply_meta or {"status": "done"}}}}
    meta = {"loopbook": {"format": 1, "title": "hostile", "settings": settings or {}}}
    return json.dumps({"nbformat": 4, "nbformat_minor": 5, "metadata": meta, "cells": [code, prompt]}).encode()


# Each of these imported fine and then made its dialog's page answer 500 for good.
HOSTILE_METADATA = [
    {"reply_meta": {"status": "done", "figures": {"ttft_s": "fast", "prompt_tokens": "many"}}},
    {"reply_meta": {"status": "done", "figures": [1, 2]}},
    {"reply_meta": {"status": {"nested": "dict"}}},
    {"reply_meta": {"status": ["error"], "request_id": {"x": 1}}},
    {"code_meta": {"status": "ok", "truncated": True, "original_chars": "many"}},
    {"code_meta": {"status": {"a": 1}, "message": ["x"]}},
    {"settings": {"system_prompt": 5}},
    {"settings": {"adapter": ["a", "b"]}},
    {"settings": {"evil": 1, "rounds": 2}},
]


@pytest.mark.parametrize("hostile", HOSTILE_METADATA, ids=lambda h: json.dumps(h)[:40])
def test_hostile_loopbook_metadata_is_normalised_on_import(c, hostile):
    r = c.post("/api/dialogs/import", content=loopbook_notebook(**hostile))
    assert r.status_code == 200, r.text
    did, notices = r.json()["id"], r.json()["notices"]
    assert any("left out" in n for n in notices), notices
    page = c.get(f"/d/{did}")
    assert page.status_code == 200, page.text[:300]
    audit(page.text, "dialog with hostile metadata")
    d = c.get(f"/api/dialogs/{did}").json()
    assert "evil" not in d["settings"] and not isinstance(d["settings"].get("system_prompt", ""), int)
    # The dialog's settings can still be saved, from the API and from the page.
    assert c.patch(f"/api/dialogs/{did}", json={"settings": {"candidates": 2}}).status_code == 200
    r = c.post(f"/d/{did}/settings", data={"rounds": "1", "candidates": "", "retry": "", "system_prompt": "",
                                           "repeat_resamples": "", "adapter": ""}, headers={"HX-Request": "true"})
    assert "Settings saved" in r.text, r.text


def test_the_page_never_trusts_stored_metadata(server, c):
    """An older store (or anything else that wrote the file) may hold metadata of any type: the page renders."""
    did = c.post("/api/dialogs", json={"title": "older store"}).json()["id"]
    code = c.post(f"/api/dialogs/{did}/messages", json={"type": "code", "source": "x"}).json()["id"]
    prompt = c.post(f"/api/dialogs/{did}/messages", json={"type": "prompt", "source": "q"}).json()["id"]
    db = sqlite3.connect(server.data_dir / "loopbook.db", timeout=30)
    try:
        with db:
            db.execute("UPDATE messages SET output_meta = ? WHERE id = ?",
                       (json.dumps({"status": {"a": 1}, "truncated": True, "original_chars": "many"}), code))
            db.execute("UPDATE messages SET reply = 'r', reply_meta = ? WHERE id = ?",
                       (json.dumps({"status": {"a": 1}, "figures": {"ttft_s": "fast", "tokens_per_s": [1]}}), prompt))
            db.execute("UPDATE dialogs SET settings = ? WHERE id = ?",
                       (json.dumps({"system_prompt": 5, "adapter": ["x"], "evil": 1}), did))
    finally:
        db.close()
    r = c.get(f"/d/{did}")
    assert r.status_code == 200, r.text[:300]
    assert c.post(f"/cells/{prompt}/stop", headers={"HX-Request": "true"}).status_code == 200
    # A key this Loopbook does not know can be removed (null removes any setting), and does not block others.
    assert c.patch(f"/api/dialogs/{did}", json={"settings": {"evil": None, "system_prompt": None,
                                                             "adapter": None}}).status_code == 200
    assert c.get(f"/api/dialogs/{did}").json()["settings"] == {}
    assert c.patch(f"/api/dialogs/{did}", json={"settings": {"evil": 2}}).status_code == 400


@pytest.mark.parametrize("where", ["title", "cell", "output", "settings key"])
def test_a_lone_surrogate_in_a_notebook_is_refused_and_imports_nothing(c, where):
    nb = json.loads(loopbook_notebook())
    bad = "broken \ud800 text"
    if where == "title":
        nb["metadata"]["loopbook"]["title"] = bad
    elif where == "cell":
        nb["cells"][0]["source"] = bad
    elif where == "output":
        nb["cells"][0]["outputs"] = [{"output_type": "stream", "name": "stdout", "text": bad}]
    else:
        nb["metadata"]["loopbook"]["settings"] = {bad: 1}
    before = len(c.get("/api/dialogs").json())
    r = c.post("/api/dialogs/import", content=json.dumps(nb).encode())  # json.dumps escapes it as \ud800
    assert r.status_code == 400 and "lone surrogate" in r.json()["error"] and "nothing was imported" in r.json()["error"]
    r = c.post("/dialogs/import", files={"file": ("x.ipynb", json.dumps(nb).encode(), "application/json")})
    assert r.status_code == 400 and "lone surrogate" in r.text
    assert len(c.get("/api/dialogs").json()) == before


def test_execution_counts_beyond_sqlite_are_dropped_not_a_500(c):
    nb = json.loads(loopbook_notebook(execution_count=2**63))
    nb["cells"][0]["outputs"] = [{"output_type": "execute_result", "execution_count": -(2**64), "metadata": {},
                                  "data": {"text/plain": "1"}}]
    r = c.post("/api/dialogs/import", content=json.dumps(nb).encode())
    assert r.status_code == 200, r.text
    cell = c.get(f"/api/dialogs/{r.json()['id']}").json()["messages"][0]
    assert cell["execution_count"] is None and cell["outputs"][0]["execution_count"] is None
    assert c.get(f"/d/{r.json()['id']}").status_code == 200


# -- the .py export: a comment stays a comment ------------------------------------------------------------------

@pytest.mark.parametrize("brk", ["\r", "\r\n", "\n", "\x0c", "\x0b", "\x1c", "\x85", "\u2028", "\u2029"])
def test_py_export_comments_hide_no_code(c, tmp_path, brk):
    import subprocess
    import sys

    did = c.post("/api/dialogs", json={"title": "exported"}).json()["id"]
    for type_, source in (("note", f"# Harmless{brk}print('INJECTED-NOTE')"),
                          ("prompt", f"q{brk}print('INJECTED-PROMPT')"),
                          ("code", f"def broken(:{brk}print('INJECTED-CODE')"),
                          ("code", f"%time 1{brk}x = (1{brk}print('INJECTED-MAGIC')")):
        c.post(f"/api/dialogs/{did}/messages", json={"type": type_, "source": source})
    r = c.get(f"/api/dialogs/{did}/export", params={"format": "py"})
    script = tmp_path / "exported.py"
    script.write_bytes(r.content)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "INJECTED" not in done.stdout, done.stdout
