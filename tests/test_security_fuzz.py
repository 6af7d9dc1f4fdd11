"""Bad input everywhere: every API route gets garbage, and answers each with a clean error, never a 500."""

import json
import sqlite3

import httpx
import pytest

from apphelpers import Server, wait_for_model
from securityhelpers import fill, routes

MAX_BODY = 256 * 1024

# Routes that read a JSON body (the rest ignore theirs); kept in step with app.py by the test below.
BODY_ROUTES = {("POST", "/api/dialogs"), ("PATCH", "/api/dialogs/{id}"), ("POST", "/api/dialogs/{id}/duplicate"),
               ("POST", "/api/dialogs/{id}/messages"), ("PATCH", "/api/messages/{id}"),
               ("POST", "/api/messages/{id}/move"), ("POST", "/api/messages/{id}/ask"),
               ("POST", "/api/messages/{id}/solve"), ("POST", "/api/messages/{id}/fix"), ("POST", "/api/export"),
               ("POST", "/api/dialogs/{id}/complete"), ("POST", "/api/dialogs/{id}/inspect"),
               ("POST", "/api/dialogs/{id}/ghost"), ("POST", "/api/dialogs/{id}/ghost/outcome")}

BAD_IDS = ["999999", "abc", "-1", "0", "1.5", "9" * 30, "9" * 5000, "0x10", "%00", "1%00", "%F0%9F%98%80",
           "%E2%80%AE1", "%ED%A0%80", "%C0%AE%C0%AE", "..%2F..%2Fetc%2Fpasswd", "..", "%20", "1e3", "nan", "true"]

MALFORMED = [b"{", b"not json", b'{"a":}', b"\xff\xfe\x00", b'{"title": NaN}', b'{"title": Infinity}', b"[" * 100_000,
             b'{"a":' * 50_000, b"null", b"[]", b'"a string"', b"1", b"true", b'{"title": "x"} trailing',
             b'{"title": "\\ud800"}', b'{"source": "\\udfff tail"}', b'{"\\ud800": 1}', b"\xef\xbb\xbf{}",
             b'{"title": "a\\u0000b"}', b"title=form&encoded=1", b"{}" * 1000]

FIELDS = ["title", "settings", "type", "source", "after", "before", "version", "pinned", "skipped", "is_test",
          "reply", "offset", "rounds", "candidates", "retry", "exec_timeout", "max_tokens", "temperature", "seed",
          "top_p", "top_k", "min_p", "repeat_penalty", "model", "backend", "author", "outputs", "id", "code",
          "cursor_pos", "message_id", "cursor", "outcome"]
VALUES = [None, True, False, -1, 0, 1.5, 10**30, -(10**30), "x", "", [], {}, [1, "a"], {"a": {"b": [None]}},
          "../../../../etc/passwd", "/dev/zero", "\u202e\u200f", "😀" * 10, "\x00", "a" * 10_000,
          {"temperature": "hot", "rounds": -5, "system_prompt": 7, "max_tokens": "x", "seed": "s"}]


def bodies_for(field):
    for v in VALUES:
        yield json.dumps({field: v}).encode()


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("fuzz"), "--model", "smollm2-135m", "--max-tokens", "8",
               "--max-body", str(MAX_BODY), "--exec-timeout", "5", "--rounds", "0").start()
    with s.client() as c:
        wait_for_model(c)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def targets(srv):
    """A dialog with one cell of each type (and a canary dialog that nothing may touch)."""
    with srv.client() as c:
        canary = c.post("/api/dialogs", json={"title": "canary"}).json()["id"]
        c.post(f"/api/dialogs/{canary}/messages", json={"type": "note", "source": "must survive"})
        did = c.post("/api/dialogs", json={"title": "target"}).json()["id"]
        ids = {t: c.post(f"/api/dialogs/{did}/messages", json={"type": t, "source": "x = 1" if t == "code" else "hi"})
               .json()["id"] for t in ("code", "note", "prompt")}
        # The model routes get their own small dialog: the fuzzed one grows to thousands of cells, and a
        # prompt below them all would make every generation read them.
        model_dialog = c.post("/api/dialogs", json={"title": "model target"}).json()["id"]
        asked = c.post(f"/api/dialogs/{model_dialog}/messages", json={"type": "prompt", "source": "Say hi."}).json()["id"]
        return {"dialog": did, **ids, "asked": asked, "canary": canary,
                "canary_state": c.get(f"/api/dialogs/{canary}").json()}


def api_routes():
    return [(m, t) for m, t in routes() if t.startswith("/api/") and m != "HEAD"]


def clean(r, what, named_model=False):
    """A clean answer: below 500 (503 only for a model the request named), JSON errors, no traceback."""
    assert r.status_code < 500 or (named_model and r.status_code == 503), (what, r.status_code, r.text[:300])
    assert "Traceback" not in r.text and 'File "' not in r.text, (what, r.text[:300])
    if r.status_code >= 400:
        assert r.headers["content-type"].startswith("application/json"), (what, r.headers["content-type"])
        err = r.json()["error"]
        assert isinstance(err, str) and len(err) > 5, (what, err)


def test_body_routes_are_the_ones_that_read_bodies():
    import inspect

    from securityhelpers import app_module

    src = inspect.getsource(app_module())
    reads = set()
    for block in src.split("\n@route(")[1:]:
        _, method, _, path, _ = block.split('"', 4)
        func = block.split("\n\n\n")[0]
        if path.startswith("/api/") and ("json_body(" in func or "loop_response(" in func):
            reads.add((method, path))
    assert reads == BODY_ROUTES


def test_bad_ids_on_every_api_route(srv, targets):
    with srv.client() as c:
        n = 0
        for method, template in api_routes():
            for bad in BAD_IDS:
                if "{id}" not in template:
                    continue
                r = c.request(method, fill(template, id=bad), content=b"{}")
                clean(r, (method, template, bad))
                # ("..": the client resolves the dot segment, and the router redirects to a slash form.)
                assert r.status_code in ((307, 400, 404, 405) if bad == ".." else (400, 404, 405)), \
                    (method, template, bad, r.status_code)
                n += 1
        assert n >= 400


def live_target(template, targets):
    if "/api/messages/" in template:
        return targets["asked"] if template.endswith(("/ask", "/solve")) else targets["code"]
    return targets["dialog"]


def test_malformed_bodies_and_wrong_types(srv, targets):
    with srv.client(timeout=120) as c:
        n = 0
        for method, template in sorted(BODY_ROUTES):
            path = fill(template, id=live_target(template, targets))
            for raw in MALFORMED:
                r = c.request(method, path, content=raw, headers={"Content-Type": "application/json"})
                clean(r, (method, template, raw[:40]))
                n += 1
            for field in FIELDS:
                for raw in bodies_for(field):
                    if template.endswith(("/ask", "/solve", "/fix")) and field not in ("model", "backend"):
                        # A body that validates would start a generation: keep those to the bad ones.
                        if json.loads(raw)[field] in (None, "", [], {}) or field in ("id",):
                            continue
                    r = c.request(method, path, content=raw, headers={"Content-Type": "application/json"})
                    clean(r, (method, template, raw[:60]), named_model=field in ("model", "backend"))
                    n += 1
        assert n >= 1500


def test_unicode_edge_cases_are_kept_or_refused_never_mangled(srv, targets):
    with srv.client() as c:
        keep = ["a\x00b", "\u202eevil\u202c.txt", "\u200f\u200eRTL", "😀" * 100, "e\u0301\u0301\u0301", "\ufeffbom",
                "tab\tnew\nline", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "\U0010fffd"]
        for text in keep:
            did = c.post("/api/dialogs", json={"title": text}).json()["id"]
            mid = c.post(f"/api/dialogs/{did}/messages", json={"type": "note", "source": text * 50}).json()["id"]
            assert c.get(f"/api/messages/{mid}").json()["source"] == text * 50
            assert c.get(f"/api/dialogs/{did}").json()["title"] == text.strip()
            assert c.get(f"/d/{did}").status_code == 200
            r = c.get(f"/api/dialogs/{did}/export", params={"format": "ipynb"})
            assert r.status_code == 200 and "/" not in r.headers["content-disposition"].split("filename=")[1]
        r = c.post("/api/dialogs", json={"title": "t" * 10_000})
        clean(r, "10k title")
        assert r.status_code == 400 and "at most" in r.json()["error"]
        for raw in (b'{"title": "\\ud800"}', b'{"title": "ok", "settings": {"\\udc00": 1}}'):
            r = c.post("/api/dialogs", content=raw)
            assert r.status_code == 400 and "surrogate" in r.json()["error"]


def test_path_traversal_in_names_and_export_paths(srv, targets):
    with srv.client() as c:
        did = targets["dialog"]
        for fmt in ("../../etc/passwd", "..%2F..%2Fetc%2Fpasswd", "ipynb/../../x", "ipynb\x00.py", "/etc/passwd", "",
                    "IPYNB", "ipynb "):
            r = c.get(f"/api/dialogs/{did}/export", params={"format": fmt})
            clean(r, fmt)
            assert r.status_code == 400 and "format" in r.json()["error"]
        for title in ("../../../../etc/passwd", "..\\..\\boot.ini", "/etc/shadow", "~/.ssh/id_rsa", "a/../../b",
                      "file:///etc/passwd", "CON", "x" * 199 + "/"):
            d = c.post("/api/dialogs", json={"title": title}).json()["id"]
            r = c.get(f"/api/dialogs/{d}/export", params={"format": "py"})
            name = r.headers["content-disposition"].split("filename=")[1].strip('"')
            assert "/" not in name and "\\" not in name and not name.startswith(".") and name.endswith(".py")
            r = c.post("/api/dialogs/import", params={"title": title},
                       content=json.dumps({"nbformat": 4, "nbformat_minor": 5, "metadata": {}, "cells": []}))
            clean(r, title)
        for path in ("/static/../app.py", "/static/%2e%2e/app.py", "/static/..%2Fapp.py", "/static/build/package.json",
                     "/static/vendor/../../app.py", "/static//etc/passwd", "/static/%00"):
            r = c.get(path)
            assert r.status_code in (400, 404), (path, r.status_code)
            assert "def main" not in r.text and "root:" not in r.text
        for q in ("%", "_", "' OR 1=1 --", "\\", '"; DROP TABLE dialogs; --'):
            r = c.get("/api/dialogs", params={"q": q})
            assert r.status_code == 200
        assert c.get("/api/dialogs", params={"q": "canary"}).json()[0]["title"] == "canary"


def chunks(total, size=32 * 1024):
    sent = 0
    while sent < total:
        yield b"x" * min(size, total - sent)
        sent += size


def test_huge_bodies_are_refused_with_413(srv, targets):
    with srv.client(timeout=60) as c:
        writes = [(m, t) for m, t in api_routes() if m in ("POST", "PATCH", "PUT")]
        for method, template in writes:
            path = fill(template, id=live_target(template, targets))
            r = c.request(method, path, content=b"{" + b" " * (MAX_BODY + 10) + b"}")  # with a Content-Length
            clean(r, (method, template, "content-length"))
            assert r.status_code == 413 and "--max-body" in r.json()["error"]
        # No Content-Length (chunked): refused while it is read, for the routes that read bodies.
        for method, template in sorted(BODY_ROUTES) + [("POST", "/api/dialogs/import")]:
            path = fill(template, id=live_target(template, targets))
            r = c.request(method, path, content=chunks(MAX_BODY * 4), headers={"Content-Type": "application/json"})
            clean(r, (method, template, "chunked"))
            assert r.status_code == 413, (method, template, r.status_code)
        # A page form is held to the same limit.
        def upload():
            yield b'--x\r\nContent-Disposition: form-data; name="file"; filename="big.ipynb"\r\n\r\n'
            yield from chunks(MAX_BODY * 2)
            yield b"\r\n--x--\r\n"
        r = c.post("/dialogs/import", content=upload(), headers={"Content-Type": "multipart/form-data; boundary=x"})
        assert r.status_code == 413
        # Just under the limit is fine.
        r = c.post("/api/dialogs", content=json.dumps({"title": "small", "pad": "y" * (MAX_BODY - 100)}))
        assert r.status_code == 200


def test_nothing_was_lost_and_the_store_is_whole(srv, targets):
    with srv.client() as c:
        assert c.get(f"/api/dialogs/{targets['canary']}").json() == targets["canary_state"]
        assert c.get("/api/model").json()["state"] == "ready"
    conn = sqlite3.connect(srv.data_dir / "loopbook.db")
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        conn.close()
    log = srv.log.read_text()
    assert "Traceback" not in log, log[-3000:]


def test_bad_settings_are_refused_where_they_are_set_and_change_nothing(srv):
    with srv.client() as c:
        did = c.post("/api/dialogs", json={"title": "settings"}).json()["id"]
        assert c.patch(f"/api/dialogs/{did}", json={"settings": {"temperature": 0.5, "rounds": 2}}).status_code == 200
        for bad in ({"temperature": "hot"}, {"seed": "x"}, {"top_p": 2}, {"rounds": -1}, {"retry": "sometimes"},
                    {"system_prompt": 7}, {"colour": "blue"}, {"max_tokens": True}, {"exec_timeout": 0}):
            r = c.patch(f"/api/dialogs/{did}", json={"title": "renamed", "settings": bad})
            clean(r, bad)
            assert r.status_code == 400, (bad, r.text)
            d = c.get(f"/api/dialogs/{did}").json()
            assert d["title"] == "settings" and d["settings"] == {"temperature": 0.5, "rounds": 2}  # all or nothing
        assert c.patch(f"/api/dialogs/{did}", json={"settings": {"rounds": None}}).json()["settings"] == \
            {"temperature": 0.5}


def test_an_unknown_backend_is_refused_by_name(srv, targets):
    # It was ignored, and the resident local model answered a request that asked for another backend.
    with srv.client() as c:
        before = c.get(f"/api/messages/{targets['asked']}").json()
        for route, target in (("ask", targets["asked"]), ("solve", targets["asked"])):
            for backend in ("evil", "LLAMA2", "../llama"):
                r = c.post(f"/api/messages/{target}/{route}", json={"backend": backend})
                clean(r, (route, backend))
                assert r.status_code == 400, (route, backend, r.status_code, r.text[:200])
                assert all(name in r.json()["error"] for name in ("llama", "anthropic", "openai"))
        assert c.get(f"/api/messages/{targets['asked']}").json() == before


# Header values no browser sends (bytes go as they are: latin-1 on the wire). Each once reached code that
# trusted it, or could: str.isdigit() takes "²", int() refuses 4,301 digits, urlsplit() raises on "[".
BAD_HEADERS = [
    {"Authorization": b"token lbk\xb2.x"}, {"Authorization": b"token lbk" + b"9" * 5000 + b".x"},
    {"Authorization": b"token lbk1." + b"f" * 32}, {"Authorization": b"token lbk\xd9\xa1." + b"0" * 32},
    {"Authorization": b"Bearer"}, {"Authorization": b"token \xff\xfe"}, {"Authorization": b"token " + b"x" * 8000},
    {"Cookie": b"loopbook_session_{port}=\xff"}, {"Cookie": b"=;;=; a; b=\"unterminated"},
    {"Cookie": b"loopbook_session_{port}=lbs_" + b"A" * 5000}, {"Cookie": b"source=cookie; base=cookie; id=1"},
    {"Origin": b"http://[::1"}, {"Origin": b"null"}, {"Origin": b"\xff://\xb2"}, {"Origin": b"http://127.0.0.1:99999"},
    {"Sec-Fetch-Site": b"\xb2"}, {"Host": b"[::1"}, {"Host": b"localhost:5099.evil.com"}, {"Host": b"\xb2"},
    {"Host": b"localhost:" + b"9" * 100}, {"Host": b"evil.com@localhost"},
    {"Last-Event-ID": b"\xb2"}, {"Last-Event-ID": b"9" * 5000}, {"Last-Event-ID": b"-1"},
    {"Content-Type": b"multipart/form-data"}, {"Content-Type": b"multipart/form-data; boundary="},
    {"Content-Type": b"application/x-www-form-urlencoded; charset=\xff"}, {"Content-Type": b"application/json; x"},
    {"Accept": b"text/html"}, {"Accept": b"text/event-stream"}, {"Accept": b"\xff"},
    {"X-Loopbook-Tab": b"\xff" * 100}, {"HX-Request": b"\xb2"}, {"Range": b"bytes=99999999999999999999999-"},
    {"If-None-Match": b"\xff"}, {"If-Modified-Since": b"\xb2"},
]


def test_malformed_headers_on_every_route(srv, targets):
    """Every route, each malformed header: a 4xx (or the ordinary answer, when the header is just ignored) with
    the security headers, never a 5xx. Writes aim at a cell that does not exist, so nothing runs or changes."""
    log_before = len(srv.log.read_text())
    ids = {"GET": targets["code"], "HEAD": targets["code"]}
    n = 0
    token = srv.headers["Authorization"].encode()
    with httpx.Client(base_url=srv.base, timeout=120) as c:
        for method, template in routes():
            for bad in BAD_HEADERS:
                target = ids.get(method, 999999)
                if "/d/" in template or template.startswith("/api/dialogs/{id}"):
                    target = targets["canary"] if method in ("GET", "HEAD") else 999999  # small, and read only
                path = fill(template, id=target)
                headers = {k: v.replace(b"{port}", str(srv.port).encode()) for k, v in bad.items()}
                if "Authorization" not in headers and "Cookie" not in headers:
                    headers["Authorization"] = token
                r = c.request(method, path, headers=headers, content=b"{}")
                what = (method, template, bad)
                assert r.status_code < 500, (what, r.status_code, r.text[:300])
                assert r.headers.get("x-frame-options") == "DENY", what
                assert "frame-ancestors 'none'" in r.headers.get("content-security-policy", ""), what
                if "Traceback" in r.text or 'File "' in r.text:
                    raise AssertionError((what, r.text[:300]))
                n += 1
    assert n >= 60 * len(BAD_HEADERS)
    assert "Traceback" not in srv.log.read_text()[log_before:], srv.log.read_text()[log_before:][-3000:]
