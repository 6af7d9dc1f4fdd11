"""Who gets in: binding, token auth on every route, the login cookie, CSRF, Host checks, kernel tokens."""

import inspect
import os
import socket
import subprocess
import sys
import time

import httpx
import pytest

from apphelpers import ROOT, TOKEN, free_port
from securityhelpers import app_module, fill, routes, snapshot
from execfeedback.helper_setup import kernel_token

WRITE_METHODS = {"POST", "PUT", "PATCH", "DELETE"}


def new_dialog(c, title="t"):
    r = c.post("/api/dialogs", json={"title": title})
    assert r.status_code == 200, r.text
    return r.json()["id"]


def add(c, did, type="code", source=""):
    r = c.post(f"/api/dialogs/{did}/messages", json={"type": type, "source": source})
    assert r.status_code == 200, r.text
    return r.json()["id"]


# -- binding -----------------------------------------------------------------------------------------

def start_app(tmp_path, *args, token=None, wait_for=None):
    env = {k: v for k, v in os.environ.items() if k != "LOOPBOOK_TOKEN"}
    if token is not None:
        env["LOOPBOOK_TOKEN"] = token
    return subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--data-dir", str(tmp_path / "data"),
                             "--model", "/no/model.gguf", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("token", [None, "", "short-token"])
def test_another_address_refuses_to_start_without_a_real_token(tmp_path, token):
    # Even a token kept in the data dir is not an explicit choice for a network bind.
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "token").write_text("kept-from-an-earlier-loopback-run")
    p = start_app(tmp_path, "--host", "0.0.0.0", "--port", str(free_port()), token=token)
    out, err = p.communicate(timeout=60)
    assert p.returncode != 0
    assert "Refusing to bind 0.0.0.0" in err and ("without an explicit token" in err or "at least 16" in err)


def test_loopback_is_the_default_and_another_address_starts_with_a_token(tmp_path):
    assert app_module().parse_config([]).host == "127.0.0.1"
    port = free_port()
    token = "a-long-enough-network-token-123"
    # 127.0.0.2 is a "non-default" address that stays on this machine.
    p = start_app(tmp_path, "--host", "127.0.0.2", "--port", str(port), "--allow-host", "loopbook.test", token=token)
    try:
        deadline, status = time.time() + 60, None
        while time.time() < deadline and p.poll() is None:
            try:
                status = httpx.get(f"http://127.0.0.2:{port}/api/dialogs", timeout=2,
                                   headers={"Authorization": f"token {token}"}).status_code
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        assert status == 200
        assert (tmp_path / "data").stat().st_mode & 0o777 == 0o700  # the store is for your eyes only
        base = f"http://127.0.0.2:{port}"
        assert httpx.get(base + "/api/dialogs").status_code == 401
        # --allow-host names are accepted in the Host header, and nothing else is.
        h = {"Authorization": f"token {token}"}
        assert httpx.get(base + "/api/dialogs", headers={**h, "Host": "loopbook.test"}).status_code == 200
        assert httpx.get(base + "/api/dialogs", headers={**h, "Host": "evil.example"}).status_code == 403
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{port}/api/dialogs", timeout=2)
    finally:
        p.terminate()
        p.communicate(timeout=30)


def test_a_kept_token_is_private_and_stable(tmp_path):
    app = app_module()
    token = app.resolve_token(app.Config(), tmp_path)
    assert len(token) >= 32 and (tmp_path / "token").stat().st_mode & 0o777 == 0o600
    assert app.resolve_token(app.Config(), tmp_path) == token


# -- token auth on every route ----------------------------------------------------------------------

def test_the_route_table_is_what_these_tests_expect():
    table = routes()
    assert len(table) >= 50
    assert ("GET", "/cells/{id}/stream") in table and ("POST", "/api/messages/{id}/ask") in table
    assert ("GET", "/static/app.css") in table


@pytest.mark.parametrize("credentials", [
    {},
    {"headers": {"Authorization": "token wrong"}},
    {"headers": {"Authorization": f"token {TOKEN}x"}},
    {"headers": {"Authorization": f"Basic {TOKEN}"}},
    {"headers": {"Cookie": "loopbook_session=forged"}},
    {"headers": {"Cookie": f"loopbook_session={TOKEN}"}},  # the token itself is not the cookie value
], ids=["none", "wrong", "longer", "basic", "forged-cookie", "token-as-cookie"])
def test_every_route_refuses_without_credentials(server, c, credentials):
    did = new_dialog(c)
    mid = add(c, did, "code", "print(1)")
    before = snapshot(server.data_dir / "loopbook.db")
    checked = 0
    with httpx.Client(base_url=server.base, timeout=30) as anon:
        for method, template in routes() + [("GET", "/no/such/route"), ("OPTIONS", "/api/dialogs")]:
            path = fill(template, id=mid if "/cells/" in template or "/messages/" in template else did)
            r = anon.request(method, path, **credentials)
            assert r.status_code == 401, (method, path, r.status_code, r.text[:200])
            if method != "HEAD":
                assert "Log in" in r.text
            assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
            checked += 1
    assert checked >= 50
    assert snapshot(server.data_dir / "loopbook.db") == before


def test_near_miss_and_odd_tokens_are_refused_at_every_door(server):
    """Each place a token or login id is compared (the ?token= login, the Authorization header, the login
    cookie) refuses a near miss, and bytes that are not ASCII, with a 401 and never a server error."""
    with httpx.Client(base_url=server.base, timeout=30) as anon:
        login = anon.get(f"/?token={TOKEN}", follow_redirects=False)
        cookie_name = login.headers["set-cookie"].split("=", 1)[0]
        sid = login.headers["set-cookie"].split("=", 1)[1].split(";", 1)[0]
    assert sid and cookie_name
    near = [TOKEN[:-1], TOKEN[:-1] + chr(ord(TOKEN[-1]) ^ 1), TOKEN + "\u00e9", "\u00e9" * len(TOKEN), ""]
    for bad in near:
        with httpx.Client(base_url=server.base, timeout=30) as anon:
            r = anon.get("/api/dialogs", params={"token": bad}, follow_redirects=False)
            assert r.status_code == 401 and "set-cookie" not in r.headers, (bad, r.status_code)
            r = anon.get("/api/dialogs", headers={"Authorization": f"token {bad}".rstrip().encode()})
            assert r.status_code == 401, (bad, r.status_code)
        for cookie in (bad, sid[:-1], sid[:-1] + chr(ord(sid[-1]) ^ 1), sid + "\u00e9"):
            with httpx.Client(base_url=server.base, timeout=30) as anon:
                r = anon.get("/api/dialogs", headers={"Cookie": f"{cookie_name}={cookie}".encode()})
                assert r.status_code == 401, (cookie, r.status_code)


def test_login_cookie(server):
    with httpx.Client(base_url=server.base, timeout=30) as browser:
        r = browser.get("/?token=wrong", follow_redirects=False)
        assert r.status_code == 401 and "set-cookie" not in r.headers
        r = browser.get(f"/api/dialogs?q=abc&token={TOKEN}", follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/api/dialogs?q=abc"
        cookie = r.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie and "path=/" in cookie
        assert TOKEN.lower() not in cookie
        assert browser.get("/api/dialogs").status_code == 200
        # The redirect never leaves the site, whatever the path looks like.
        r = browser.get(f"//evil.example/?token={TOKEN}", follow_redirects=False)
        assert r.headers["location"].startswith("/") and not r.headers["location"].startswith("//")
    with httpx.Client(base_url=server.base, timeout=30) as other:
        # A token in the query logs in only through GET; a POST with it is just unauthenticated.
        assert other.post(f"/api/dialogs?token={TOKEN}", json={"title": "x"}).status_code == 401


# -- cross-site requests ----------------------------------------------------------------------------

@pytest.mark.parametrize("headers", [
    {"Origin": "http://evil.example"},
    {"Origin": "null"},  # a sandboxed frame, a data: URL, a file
    {"Origin": "http://127.0.0.1:1"},  # another port on this machine is same-site, not same-origin
    {"Origin": "http://localhost:{port}"},  # another origin for the same server
    {"Origin": "https://127.0.0.1:{port}"},
    {"Sec-Fetch-Site": "cross-site"},
    {"Sec-Fetch-Site": "same-site"},
    {"Sec-Fetch-Site": "cross-site", "Origin": "http://127.0.0.1:{port}"},
], ids=["other-site", "null", "other-port", "other-name", "other-scheme", "cross-site", "same-site", "mixed"])
def test_cross_site_writes_are_refused_on_every_route(server, c, headers):
    headers = {k: v.format(port=server.port) for k, v in headers.items()}
    did = new_dialog(c, "target")
    mid = add(c, did, "code", "x = 1")
    before = snapshot(server.data_dir / "loopbook.db")
    # A browser sends the login cookie along: it must not help.
    cookie = {"Cookie": f"loopbook_session={app_module()._session_value(TOKEN)}"}
    for method, template in routes():
        if method not in WRITE_METHODS:
            continue
        path = fill(template, id=mid if "/cells/" in template or "/messages/" in template else did)
        for auth in (c.headers, cookie):
            r = httpx.request(method, server.base + path, headers={**auth, **headers}, json={"title": "csrf"},
                              timeout=30)
            assert r.status_code == 403, (method, path, r.status_code, r.text[:200])
            assert "Cross-site" in r.json()["error"]
    assert snapshot(server.data_dir / "loopbook.db") == before


@pytest.mark.parametrize("headers", [{}, {"Sec-Fetch-Site": "same-origin", "Origin": "http://127.0.0.1:{port}"},
                                     {"Sec-Fetch-Site": "none"}, {"Origin": "http://127.0.0.1:{port}"}])
def test_same_origin_writes_pass(server, c, headers):
    headers = {k: v.format(port=server.port) for k, v in headers.items()}
    r = c.post("/api/dialogs", json={"title": "same origin"}, headers=headers)
    assert r.status_code == 200, r.text


def test_get_routes_have_no_side_effects(server, c):
    did = new_dialog(c, "read only")
    mid = add(c, did, "code", "print('out')")
    assert c.post(f"/api/messages/{mid}/run").json()["status"] == "ok"
    pid = add(c, did, "prompt", "why?")
    c.patch(f"/api/messages/{pid}", json={"reply": "because"})
    idle = new_dialog(c, "never ran")
    add(c, idle, "code", "print(2)")
    db = server.data_dir / "loopbook.db"
    before = snapshot(db)
    gets = [t for m, t in routes() if m in ("GET", "HEAD")]
    for template in gets:
        for target, message in ((did, mid), (did, pid), (idle, mid)):
            path = fill(template, id=message if "/cells/" in template or "/messages/" in template else target)
            for method in ("GET", "HEAD"):
                r = c.request(method, path)
                assert r.status_code < 500, (method, path, r.status_code)
    assert snapshot(db) == before
    assert c.get(f"/api/dialogs/{idle}/kernel").json()["state"] == "none"  # reading never starts a kernel


# -- Host header ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("host,ok", [
    ("evil.example", False), ("127.0.0.1.evil.example", False), ("localhost.evil.example", False),
    ("evil.example:{port}", False), ("127.0.0.1@evil.example", False), ("[::1", False), ("", False),
    ("127.0.0.1:{port}", True), ("localhost:{port}", True), ("LOCALHOST:{port}", True), ("[::1]:{port}", True),
])
def test_host_header_allow_list(server, c, host, ok):
    r = c.get("/api/dialogs", headers={"Host": host.format(port=server.port)})
    assert r.status_code == (200 if ok else 403), (host, r.status_code)
    if not ok:
        assert "not allowed" in r.json()["error"]


def test_a_request_without_a_host_is_refused(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(f"GET /api/dialogs HTTP/1.0\r\nAuthorization: token {TOKEN}\r\n\r\n".encode())
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    assert answer.split(b"\r\n", 1)[0].split(b" ")[1] in (b"400", b"403")


# -- the kernel helper's token -----------------------------------------------------------------------------

def test_kernel_token_reaches_only_its_own_dialog(server, c):
    mine, other = new_dialog(c, "mine"), new_dialog(c, "other")
    own_cell, other_cell = add(c, mine, "code", "a = 1"), add(c, other, "code", "b = 2")
    other_prompt = add(c, other, "prompt", "hi")
    ktoken = kernel_token(TOKEN, mine)
    probe = add(c, mine, "code", "import os; print(os.environ['LOOPBOOK_KERNEL_TOKEN'])")
    assert c.post(f"/api/messages/{probe}/run").json()["outputs"][0]["text"].strip() == ktoken
    k = httpx.Client(base_url=server.base, headers={"Authorization": f"token {ktoken}"}, timeout=60)
    before = snapshot(server.data_dir / "loopbook.db")
    refused = [
        ("GET", f"/api/dialogs/{other}"), ("POST", f"/api/dialogs/{other}/messages"),
        ("GET", f"/api/messages/{other_cell}"), ("PATCH", f"/api/messages/{other_cell}"),
        ("DELETE", f"/api/messages/{other_cell}"), ("POST", f"/api/messages/{other_cell}/run"),
        ("POST", f"/api/messages/{other_prompt}/ask"), ("DELETE", f"/api/dialogs/{mine}"),
        ("PATCH", f"/api/dialogs/{mine}"), ("POST", f"/api/dialogs/{mine}/restart"),
        ("POST", f"/api/messages/{own_cell}/ask"), ("POST", f"/api/messages/{own_cell}/solve"),
        ("POST", f"/api/messages/{own_cell}/move"), ("GET", "/api/dialogs"), ("POST", "/api/dialogs"),
        ("GET", "/api/model"), ("GET", f"/d/{mine}"), ("GET", "/static/app.css"), ("PUT", f"/cells/{own_cell}"),
        ("GET", f"/api/dialogs/{mine}/export"),
    ]
    for method, path in refused:
        r = k.request(method, path, json={"source": "pwned", "title": "pwned"})
        assert r.status_code == 401, (method, path, r.status_code)
    assert snapshot(server.data_dir / "loopbook.db") == before
    # What it may do: read and edit its own dialog's cells.
    assert k.get(f"/api/dialogs/{mine}").status_code == 200
    assert k.patch(f"/api/messages/{own_cell}", json={"source": "a = 2"}).status_code == 200
    assert k.post(f"/api/dialogs/{mine}/messages", json={"source": "c = 3"}).status_code == 200
    # Anchoring a new cell on another dialog's cell is refused by the store.
    assert k.post(f"/api/dialogs/{mine}/messages", json={"source": "x", "after": other_cell}).status_code == 400
    # The kernel token is no login: not as ?token=, not as the cookie.
    with httpx.Client(base_url=server.base, timeout=30) as anon:
        assert anon.get(f"/?token={ktoken}", follow_redirects=False).status_code == 401
        assert anon.get(f"/api/dialogs/{mine}", headers={"Cookie": f"loopbook_session={ktoken}"}).status_code == 401
    # A token for one dialog, edited to name another, is refused.
    forged = f"lbk{other}." + ktoken.split(".", 1)[1]
    assert httpx.get(f"{server.base}/api/dialogs/{other}", headers={"Authorization": f"token {forged}"}).status_code == 401
    k.close()
