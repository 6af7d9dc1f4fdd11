"""Who gets in: binding, token auth on every route, the login cookie, CSRF, Host checks, kernel tokens."""

import hashlib
import hmac
import os
import socket
import subprocess
import sys
import time

import httpx
import pytest

from apphelpers import ROOT, TOKEN, Server, free_port
from securityhelpers import app_module, fill, routes, snapshot
from kernels.helper_setup import kernel_token

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


# What the login cookie held before it was a random session: a fixed HMAC of the token.
OLD_COOKIE_VALUE = hmac.new(TOKEN.encode(), b"loopbook-session", hashlib.sha256).hexdigest()


@pytest.mark.parametrize("credentials", [
    {},
    {"headers": {"Authorization": "token wrong"}},
    {"headers": {"Authorization": f"token {TOKEN}x"}},
    {"headers": {"Authorization": f"Basic {TOKEN}"}},
    {"headers": {"Cookie": "loopbook_session_{port}=forged"}},
    {"headers": {"Cookie": "loopbook_session_{port}=lbs_" + "A" * 43}},
    {"headers": {"Cookie": "loopbook_session_{port}=" + TOKEN}},  # the token itself is not the cookie value
    {"headers": {"Cookie": "loopbook_session=" + OLD_COOKIE_VALUE}},  # nor anything derived from it
    {"headers": {"Cookie": "loopbook_session_{port}=" + OLD_COOKIE_VALUE}},
], ids=["none", "wrong", "longer", "basic", "forged-cookie", "forged-session", "token-as-cookie", "derived-cookie",
        "derived-cookie-new-name"])
def test_every_route_refuses_without_credentials(server, c, credentials):
    credentials = {k: {h: v.replace("{port}", str(server.port)) for h, v in hs.items()} for k, hs in credentials.items()}
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


def login(base: str) -> tuple[httpx.Client, str]:
    """A client that logged in as a browser does; and the Set-Cookie header it got."""
    browser = httpx.Client(base_url=base, timeout=30)
    r = browser.get(f"/?token={TOKEN}", follow_redirects=False)
    assert r.status_code == 303, r.text
    return browser, r.headers["set-cookie"]


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


def cookie_value(set_cookie: str, name: str) -> str:
    assert set_cookie.startswith(name + "="), set_cookie
    return set_cookie.split(";", 1)[0].split("=", 1)[1]


def test_each_login_is_a_random_session_named_for_its_port(server):
    # Browsers send a 127.0.0.1 cookie to every port there: the value must be worth nothing beyond this login.
    name = f"loopbook_session_{server.port}"
    first, set1 = login(server.base)
    second, set2 = login(server.base)
    try:
        v1, v2 = cookie_value(set1, name), cookie_value(set2, name)
        assert v1 != v2 and v1.startswith("lbs_") and len(v1) >= 40  # 32 random bytes, not derived from the token
        assert OLD_COOKIE_VALUE not in (v1, v2) and TOKEN not in v1
        assert "max-age=604800" in set1.lower()  # --session-hours' default, 168
        assert first.get("/api/dialogs").status_code == 200 and second.get("/api/dialogs").status_code == 200
    finally:
        first.close()
        second.close()


def test_logout_ends_the_session_and_clears_the_cookie(server):
    name = f"loopbook_session_{server.port}"
    browser, set_cookie = login(server.base)
    stolen = cookie_value(set_cookie, name)
    try:
        page = browser.get("/").text
        assert 'action="/logout"' in page and "Log out" in page  # visible on the home page
        # Another site cannot log you out: a logout is a write like any other.
        assert browser.post("/logout", headers={"Origin": "http://127.0.0.1:1"}).status_code == 403
        assert browser.get("/api/dialogs").status_code == 200
        r = browser.post("/logout", headers={"Origin": server.base, "Sec-Fetch-Site": "same-origin"})
        assert r.status_code == 200 and "Logged out" in r.text
        assert f"{name}=" in r.headers["set-cookie"] and "max-age=0" in r.headers["set-cookie"].lower()
        assert browser.get("/api/dialogs").status_code == 401
    finally:
        browser.close()
    # A copy of the cookie taken before (by another port's page, say) is dead too.
    assert httpx.get(server.base + "/api/dialogs", headers={"Cookie": f"{name}={stolen}"}).status_code == 401
    # Logging in again replaces a browser's session: the one it had stops working.
    browser, set_cookie = login(server.base)
    try:
        old = cookie_value(set_cookie, name)
        r = browser.get(f"/?token={TOKEN}", follow_redirects=False)
        assert cookie_value(r.headers["set-cookie"], name) != old
        assert httpx.get(server.base + "/api/dialogs", headers={"Cookie": f"{name}={old}"}).status_code == 401
        assert browser.get("/api/dialogs").status_code == 200
    finally:
        browser.close()


def test_sessions_expire_and_do_not_outlive_the_server(tmp_path):
    s = Server(tmp_path / "sessions", "--model", "/no/model.gguf", "--session-hours", "0.001").start()  # 3.6 s
    try:
        name = f"loopbook_session_{s.port}"
        browser, set_cookie = login(s.base)
        assert "max-age=3;" in set_cookie.lower() + ";"
        try:
            assert browser.get("/api/dialogs").status_code == 200
            time.sleep(4)
            assert browser.get("/api/dialogs").status_code == 401  # the server keeps the expiry, not the cookie
        finally:
            browser.close()
        browser, set_cookie = login(s.base)
        value = cookie_value(set_cookie, name)
        browser.close()
        s.stop()
        s.start()
        # Sessions live in the server's memory: a restart (and so a new token) ends every login.
        assert httpx.get(s.base + "/api/dialogs", headers={"Cookie": f"{name}={value}"}).status_code == 401
    finally:
        s.stop()


def test_sessions_are_bound_to_the_token():
    sessions = app_module().Sessions()
    sid = sessions.new("token-one", 60)
    assert sessions.valid("token-one", sid)
    assert not sessions.valid("token-two", sid)  # the token changed: every session made under the old one goes
    assert not sessions.valid("token-one", sid) and len(sessions) == 0
    assert not sessions.valid("token-one", "lbs_" + "x" * 5000) and not sessions.valid("token-one", "")


@pytest.mark.parametrize("hours", ["0", "-1", "nan", "inf"])
def test_a_session_lifetime_that_makes_no_sense_is_refused(tmp_path, hours):
    p = start_app(tmp_path, "--port", str(free_port()), "--session-hours", hours, token=TOKEN)
    out, err = p.communicate(timeout=60)
    assert p.returncode != 0 and "--session-hours must be more than 0" in err


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
    browser, set_cookie = login(server.base)
    browser.close()
    cookie = {"Cookie": set_cookie.split(";", 1)[0]}
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
    # What a loose parse reads as "localhost": a port that is no number, user info, a name after the port.
    ("localhost:{port}.evil.com", False), ("evil.com@localhost", False), ("localhost:evil", False),
    ("localhost:{port}@evil.com", False), ("localhost:{port}/x", False), ("[::1]evil", False),
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
    ktoken = kernel_token(TOKEN, mine, c.get(f"/api/dialogs/{mine}").json()["created_at"])
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


def test_a_kernel_token_dies_with_its_dialog_and_ids_are_never_reused(server, c):
    # Delete the newest dialog and make another: the deleted one's kernel token must not open it.
    newest = new_dialog(c, "to be deleted")
    add(c, newest, "code", "x = 1")
    ktoken = kernel_token(TOKEN, newest, c.get(f"/api/dialogs/{newest}").json()["created_at"])
    k = {"Authorization": f"token {ktoken}"}
    assert httpx.get(f"{server.base}/api/dialogs/{newest}", headers=k).status_code == 200
    last_cell = c.get(f"/api/dialogs/{newest}").json()["messages"][-1]["id"]
    assert c.delete(f"/api/dialogs/{newest}").status_code == 200
    assert httpx.get(f"{server.base}/api/dialogs/{newest}", headers=k).status_code == 401
    fresh = new_dialog(c, "made after")
    cell = add(c, fresh, "code", "secret = 42")
    assert fresh > newest and cell > last_cell  # AUTOINCREMENT: no id comes back
    for path in (f"/api/dialogs/{newest}", f"/api/dialogs/{fresh}", f"/api/messages/{cell}"):
        assert httpx.get(server.base + path, headers=k).status_code == 401, path
    # And a token for the new dialog's id made under the old dialog's birth is no key either.
    assert httpx.get(f"{server.base}/api/dialogs/{fresh}", headers={
        "Authorization": f"token {kernel_token(TOKEN, fresh, 'an earlier dialog')}"}).status_code == 401


# -- malformed requests before and around the gate ----------------------------------------------------------

def raw_request(port: int, head: bytes) -> tuple[int, dict[str, str]]:
    """Send bytes as they are (a client library would refuse or fix them); the status and headers back."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(head)
        answer = b""
        while b"\r\n\r\n" not in answer and (chunk := s.recv(65536)):
            answer += chunk
    lines = answer.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    headers = {name.lower(): value for name, value in (line.split(": ", 1) for line in lines[1:] if ": " in line)}
    return int(lines[0].split(" ")[1]), headers


def test_malformed_headers_get_a_4xx_with_the_usual_headers(server, c):
    did = new_dialog(c, "headers")
    mid = add(c, did, "prompt", "q")
    ktoken = kernel_token(TOKEN, did, c.get(f"/api/dialogs/{did}").json()["created_at"])
    host = f"127.0.0.1:{server.port}".encode()
    auth = f"Authorization: token {TOKEN}\r\n".encode()
    cases = [  # (what is sent, the statuses that are right for it)
        (b"GET /api/dialogs HTTP/1.1\r\nHost: " + host + b"\r\nAuthorization: token lbk\xb2.x\r\n\r\n", {401}),
        (b"GET /api/dialogs HTTP/1.1\r\nHost: " + host + b"\r\nAuthorization: token lbk" + b"9" * 5000
         + b".x\r\n\r\n", {401}),
        (b"POST /api/dialogs HTTP/1.1\r\nHost: " + host + b"\r\n" + auth + b"Origin: http://[::1\r\n"
         b"Content-Length: 2\r\n\r\n{}", {403}),
        (b"GET /cells/%d/stream HTTP/1.1\r\nHost: " % mid + host + b"\r\n" + auth + b"Last-Event-ID: \xb2\r\n\r\n",
         {200}),
        (b"GET /cells/%d/loop-stream HTTP/1.1\r\nHost: " % mid + host + b"\r\n" + auth
         + b"Last-Event-ID: \xb2\r\n\r\n", {200}),
        (b"GET /api/dialogs/" + b"4" * 4400 + b" HTTP/1.1\r\nHost: " + host + b"\r\nAuthorization: token "
         + ktoken.encode() + b"\r\n\r\n", {401}),
        (b"GET /api/dialogs/" + b"4" * 4400 + b" HTTP/1.1\r\nHost: " + host + b"\r\n" + auth + b"\r\n", {400, 404}),
        (b"GET /api/dialogs HTTP/1.1\r\nHost: " + host + b"\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
         b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nOrigin: http://[::1\r\n"
         + auth + b"\r\n", {403}),
        (b"GET /api/dialogs HTTP/1.1\r\nHost: " + host + b"\r\n" + auth + b"Cookie: a=\xff\xfe; =;;\r\n\r\n", {200}),
        (b"GET /?token=" + TOKEN.encode() + b"&x=%ff%fe HTTP/1.1\r\nHost: " + host + b"\r\n\r\n", {303}),
    ]
    for head, right in cases:
        status, headers = raw_request(server.port, head)
        assert status in right, (head[:120], status)
        assert headers.get("x-frame-options") == "DENY" and "frame-ancestors" in headers.get(
            "content-security-policy", ""), (head[:120], status, headers)
    assert "Traceback" not in server.log.read_text()


def test_page_routes_answer_bad_numbers_with_a_400_and_a_plain_message(c):
    did = new_dialog(c, "numbers")
    mid = add(c, did, "code", "print(1)")
    for r in (c.post(f"/cells/{mid}/move", data={"offset": "x"}), c.post(f"/cells/{mid}/move?offset=1e9"),
              c.get(f"/cells/{mid}/output/abc"), c.get(f"/cells/{mid}/output/{'9' * 5000}")):
        assert r.status_code == 400, (r.url, r.status_code, r.text)
        assert "whole number" in r.text and "invalid literal" not in r.text
    # The page's own requests (HX-Request) still get their message as a toast.
    r = c.post(f"/cells/{mid}/move", data={"offset": "x"}, headers={"HX-Request": "true"})
    assert r.headers["hx-retarget"] == "#toast" and "whole number" in r.text


def test_cookies_from_other_pages_on_this_host_never_reach_a_handler(server, c):
    # Cookies ignore ports: a page on 127.0.0.1:8000 can set "source" for 127.0.0.1. FastHTML reads a handler's
    # parameters from cookies before form fields, so such a cookie once replaced the text a Run saved.
    did = new_dialog(c, "cookie jar")
    mid = add(c, did, "note", "mine")
    r = c.post(f"/cells/{mid}/save", data={"source": "typed here", "base": "mine"},
               headers={"HX-Request": "true", "Cookie": "source=import os; base=mine; title=pwned"})
    assert r.status_code == 200 and "typed here" in r.text
    assert c.get(f"/api/messages/{mid}").json()["source"] == "typed here"


# -- exports are POSTs, and name models, not files -----------------------------------------------------------

def test_the_dataset_export_is_no_get_and_takes_no_path(server, c):
    before = snapshot(server.data_dir / "loopbook.db")
    # What an <img src> in a note, or another site's link, can send: a GET. It starts nothing.
    for query in ("format=all", "tokenizer_gguf=/etc/passwd&max_tokens_per_row=16"):
        r = c.get(f"/api/export?{query}")
        assert r.status_code == 405 and "POST" in r.json()["error"] and r.headers["allow"] == "POST"
    # A file path from the request is never opened, whichever way it comes.
    for how in ({"params": {"tokenizer_gguf": "/etc/passwd", "max_tokens_per_row": "16"}},
                {"data": {"tokenizer-gguf": "/etc/passwd"}}, {"json": {"tokenizer_gguf": "/etc/passwd"}}):
        r = c.post("/api/export", **how)
        assert r.status_code == 400 and "tokenizer=<model name>" in r.json()["error"], r.text
    for name in ("/etc/passwd", "../../etc/passwd", "no-such-model"):
        r = c.post("/api/export", data={"tokenizer": name, "max_tokens_per_row": "16"})
        assert r.status_code == 400 and "registered model" in r.json()["error"] and "smollm2-135m" in r.json()["error"]
    r = c.post("/api/export", data={"max_tokens_per_row": "16"})
    assert r.status_code == 400 and "needs a tokenizer" in r.json()["error"]
    # A registered name is accepted (this store has no traces to export, which is what it then says).
    r = c.post("/api/export", data={"tokenizer": "smollm2-135m", "max_tokens_per_row": "16"})
    assert r.status_code in (200, 400) and "tokenizer" not in r.text.lower()
    # A cross-site form cannot start one either.
    r = c.post("/api/export", data={"format": "all"}, headers={"Origin": "http://evil.example"})
    assert r.status_code == 403
    assert snapshot(server.data_dir / "loopbook.db") == before
    home = c.get("/").text
    assert 'action="/api/export" method="post"' in home
