"""Shared by the security and reliability tests: the app's route table, HTML audits, store snapshots."""

from __future__ import annotations

import functools
import importlib.util
import re
import sqlite3
import sys
from html.parser import HTMLParser
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUR_SCRIPTS = {"/static/vendor/htmx.min.js", "/static/vendor/htmx-ext-sse.js", "/static/vendor/codemirror.js",
               "/static/editor.js", "/static/app.js"}
URL_ATTRS = {"href", "src", "action", "formaction", "xlink:href", "data", "poster", "background", "srcset", "ping",
             "codebase", "cite", "longdesc", "manifest", "dynsrc", "lowsrc"}
# An <img> never runs what it shows (not even SVG script), so any image data URL is inert there.
SAFE_DATA_IMAGE = re.compile(r"^data:image/(png|jpeg|gif|webp|svg\+xml)[;,]", re.I)
FORBIDDEN_TAGS = {"object", "embed", "base", "applet", "frame", "frameset", "isindex", "style", "template", "svg",
                  "math", "noscript", "xmp", "plaintext", "listing", "portal"}


@functools.lru_cache(maxsize=1)
def app_module():
    """app.py imported as a module (nothing is started: create_app builds an app, its lifespan runs only under a
    server)."""
    spec = importlib.util.spec_from_file_location("loopbook_app_under_test", ROOT / "app.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def routes() -> list[tuple[str, str]]:
    """Every (method, path template) the app answers, HEAD and the static mount included."""
    app = app_module()
    out = []
    for r in app.create_app(app.Config()).routes:
        methods = getattr(r, "methods", None)
        if methods is None:  # a Mount: static files
            out += [("GET", r.path + "/app.css"), ("GET", r.path + "/vendor/htmx.min.js"),
                    ("GET", r.path + "/no-such-file.js")]
            continue
        out += [(m, r.path) for m in sorted(methods)]
    return out


def fill(template: str, **values) -> str:
    defaults = {"id": "1", "fmt": "ipynb", "n": "0"}
    return re.sub(r"\{(\w+)\}", lambda m: str(values.get(m.group(1), defaults.get(m.group(1), "1"))), template)


class Audit(HTMLParser):
    """Everything in served HTML that could run script or reach out of the page, as a list of findings."""

    def __init__(self, html: str, marker: str = "XSS"):
        super().__init__(convert_charrefs=True)
        self.marker = marker
        self.findings: list[str] = []
        self.iframes: list[dict] = []
        self.scripts: list[str | None] = []
        self.text: list[str] = []
        self.feed(html)
        self.close()

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "script":
            self.scripts.append(a.get("src"))
            src = a.get("src") or ""
            if not (src.startswith("/static/") and ".." not in src and ":" not in src):  # our own files only
                self.findings.append(f"script element {a}")
        if tag in FORBIDDEN_TAGS:
            self.findings.append(f"<{tag}> element {a}")
        if tag == "iframe":
            self.iframes.append(a)
            sandbox = a.get("sandbox")
            if sandbox is None or "allow-same-origin" in sandbox or "allow-top-navigation" in sandbox:
                self.findings.append(f"iframe without a strict sandbox: {a}")
            if a.get("src") is not None:
                self.findings.append(f"iframe with a src: {a}")
        if tag == "meta" and "http-equiv" in a:
            self.findings.append(f"meta http-equiv {a}")
        if tag == "link" and (a.get("rel") != "stylesheet" or a.get("href") not in ("/static/app.css", "/ansi.css")):
            self.findings.append(f"link {a}")
        action = a.get("action")
        if tag == "form" and action is not None and not (action.startswith("/") and not action.startswith("//")):
            self.findings.append(f"form posting elsewhere {a}")  # our forms post to our own paths
        for name, value in attrs:
            value = value or ""
            lowered = re.sub(r"[\x00-\x20]", "", value).lower()
            if name.startswith("on"):
                self.findings.append(f"event handler attribute {name}={value!r} on <{tag}>")
            if name in URL_ATTRS:
                if lowered.startswith(("javascript:", "vbscript:", "livescript:")):
                    self.findings.append(f"script URL {name}={value!r} on <{tag}>")
                if lowered.startswith("data:") and not (tag == "img" and name == "src" and SAFE_DATA_IMAGE.match(value)):
                    self.findings.append(f"data URL {name}={value[:80]!r} on <{tag}>")
            if name == "style":
                self.findings.append(f"inline style {value!r} on <{tag}>")
            # hx-confirm is only ever shown as text by window.confirm().
            active = name.startswith(("hx-", "data-hx-", "sse-", "ws-")) and name != "hx-confirm"
            if (active or name == "srcdoc" and tag != "iframe") and self.marker in value:
                self.findings.append(f"content reached an active attribute {name}={value!r} on <{tag}>")

    handle_startendtag = handle_starttag

    def handle_data(self, data):
        self.text.append(data)


def sse_events(text: str) -> list[tuple[str, str]]:
    """(event, data) pairs of an SSE body."""
    out = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        lines = block.split("\n")
        event = next((l[7:] for l in lines if l.startswith("event: ")), "message")
        data = "\n".join(l[6:] for l in lines if l.startswith("data: "))
        if any(l.startswith("data: ") for l in lines):
            out.append((event, data))
    return out


def snapshot(db_path: Path) -> dict[str, list[tuple]]:
    """Every row of every table of a store (read through its own connection; WAL lets it read beside the server)."""
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=30)
    try:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        return {t: conn.execute(f'SELECT * FROM "{t}" ORDER BY rowid').fetchall() for t in tables}
    finally:
        conn.close()
