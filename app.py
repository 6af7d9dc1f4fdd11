"""Loopbook: the web app. Config, the access gate, page components and the routes (pages and the JSON API);
the work happens in the packages. `create_app(cfg)` builds the app and keeps its state on `app.state`."""

from __future__ import annotations

import argparse
import asyncio
import base64
import functools
import hashlib
import hmac
import inspect
import json
import logging
import math
import os
import re
import secrets
import sys
import time
from dataclasses import dataclass, field, fields
from html import escape
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit

from fasthtml.common import (A, Article, Body, Button, Details, Div, EventStream, FastHTML, Form, H1, H2, Head, Header,
                             Html, Input, Label, Li, Link, Main, Meta, NotStr, Option, P, Pre, Safe, Script, Select,
                             Span, Summary, Textarea, Title, Ul, to_xml)
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import (HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response,
                                 StreamingResponse)
from starlette.staticfiles import StaticFiles

from dialog import MESSAGE_TYPES, InvalidInput, Store, StoreError, default_data_dir, lone_surrogate
from dialog.context import DEFAULT_SYSTEM_PROMPT
from dialog.notebook import export_dialog
from dialog.render import IMAGE_MIMES, ansi_css, ansi_html, markdown_html, text_of
from execfeedback.export.exporter import ExportError, options_from_mapping, stream_export_zip
from execfeedback.workspace.ghost import decide as decide_ghost, ghost as ghost_text
from execfeedback.workspace.tools import call_label
from execfeedback.workspace.workspace import Workspace
from execfeedback.settings import ASK, FORM_KEYS, LOOP, SETTINGS, Setting, from_form, keys
from kernels import KernelInitError, KernelPool, KernelStartError, apply_events
from kernels.helper_setup import dialog_of_kernel_token
from local_model import ModelError
from local_model.registry import ALIASES, MODELS, canonical_name
from local_model.registry import resolve as resolve_model
from local_model.resident import Resident

ROOT = Path(__file__).resolve().parent
log = logging.getLogger("loopbook")


# -- configuration: every knob is a flag and an environment variable ---------------------------

def size_bytes(text: str) -> int:
    """'4G', '512M', '800k' or a plain number of bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*", str(text), re.I)
    if not m:
        raise ValueError(f"{text!r} is not a size; write it like 4G, 512M or 1073741824")
    return int(float(m.group(1)) * 1024 ** " kmgt".index(m.group(2).lower() or " "))


def knob(default, flag: str, env: str, help: str = "", kind=str):
    """A Config field that is a flag and an environment variable. `default` may be a row of the settings table,
    which then gives the default, the type and the help."""
    if isinstance(default, Setting):
        default, kind, help = default.default, default.kind, default.help
    return field(default=default, metadata={"flag": flag, "env": env, "help": help, "type": kind})


@dataclass
class Config:
    host: str = knob("127.0.0.1", "--host", "LOOPBOOK_HOST", "address to bind; anything but loopback needs a token")
    port: int = knob(5001, "--port", "LOOPBOOK_PORT", "port to listen on", int)
    data_dir: str | None = knob(None, "--data-dir", "LOOPBOOK_DATA_DIR",
                                "where the store, models and token live (default ~/.loopbook)")
    token: str | None = knob(None, "--token", "LOOPBOOK_TOKEN",
                             "access token (default: a random one kept in DATA_DIR/token)")
    model: str = knob("default", "--model", "LOOPBOOK_MODEL",
                      "model: a short name (see `python -m local_model list`) or a GGUF path")
    backend: str | None = knob(None, "--backend", "LOOPBOOK_BACKEND",
                               "llama (in process), anthropic, or openai (any OpenAI-compatible server)")
    base_url: str | None = knob(None, "--base-url", "LOOPBOOK_BASE_URL",
                                "base URL of an OpenAI-compatible server (or an Anthropic proxy)")
    n_ctx: int = knob(8192, "--n-ctx", "LOOPBOOK_N_CTX", "context window in tokens for in-process models", int)
    n_gpu_layers: int | None = knob(None, "--n-gpu-layers", "LOOPBOOK_N_GPU_LAYERS",
                                    "layers to offload to the GPU (default: all that fit)", int)
    max_tokens: int = knob(SETTINGS["max_tokens"], "--max-tokens", "LOOPBOOK_MAX_TOKENS")
    temperature: float = knob(SETTINGS["temperature"], "--temperature", "LOOPBOOK_TEMPERATURE")
    rounds: int = knob(SETTINGS["rounds"], "--rounds", "LOOPBOOK_ROUNDS")
    candidates: int = knob(SETTINGS["candidates"], "--candidates", "LOOPBOOK_CANDIDATES")
    retry_candidates: int = knob(SETTINGS["retry_candidates"], "--retry-candidates", "LOOPBOOK_RETRY_CANDIDATES")
    retry_fresh: int = knob(SETTINGS["retry_fresh"], "--retry-fresh", "LOOPBOOK_RETRY_FRESH")
    select_inputs: int = knob(SETTINGS["select_inputs"], "--select-inputs", "LOOPBOOK_SELECT_INPUTS")
    repeat_resamples: int = knob(SETTINGS["repeat_resamples"], "--repeat-resamples", "LOOPBOOK_REPEAT_RESAMPLES")
    tool_steps: int = knob(SETTINGS["tool_steps"], "--tool-steps", "LOOPBOOK_TOOL_STEPS")
    tool_choice: str = knob(SETTINGS["tool_choice"], "--tool-choice", "LOOPBOOK_TOOL_CHOICE")
    exec_timeout: float = knob(120.0, "--exec-timeout", "LOOPBOOK_EXEC_TIMEOUT",
                               "seconds a cell may run before it is interrupted (0: no limit)", float)
    output_cap: int = knob(200_000, "--output-cap", "LOOPBOOK_OUTPUT_CAP",
                           "characters of output kept per cell (head and tail)", int)
    kernel_cwd: str | None = knob(None, "--kernel-cwd", "LOOPBOOK_KERNEL_CWD",
                                  "working directory of the kernels (default: where you start)")
    cull_idle: float = knob(0.0, "--cull-idle", "LOOPBOOK_CULL_IDLE", "shut kernels idle this many seconds (0: never)",
                            float)
    allow_host: str = knob("", "--allow-host", "LOOPBOOK_ALLOW_HOSTS",
                           "extra Host header values to accept, comma separated")
    max_body: int = knob(64 * 1024 * 1024, "--max-body", "LOOPBOOK_MAX_BODY", "largest request body in bytes", int)
    session_hours: float = knob(168.0, "--session-hours", "LOOPBOOK_SESSION_HOURS",
                                "hours a browser login lasts; then open the start-up URL again", float)
    kernel_memory: int = knob(0, "--kernel-memory", "LOOPBOOK_KERNEL_MEMORY",
                              "address-space limit per kernel, e.g. 4G or 512M (0: none)", size_bytes)
    ghost_delay: int = knob(600, "--ghost-delay", "LOOPBOOK_GHOST_DELAY",
                            "ms of pause in typing before the model's ghost text is asked for (0: only on Alt+.)", int)
    ghost_max_tokens: int = knob(48, "--ghost-max-tokens", "LOOPBOOK_GHOST_MAX_TOKENS",
                                 "longest ghost text in tokens (it also stops at the end of a line or block)", int)


def parse_config(argv: list[str] | None = None) -> Config:
    parser = argparse.ArgumentParser(description="Loopbook: a notebook for dialogue engineering.")
    for f in fields(Config):
        k = f.metadata
        env = os.environ.get(k["env"])
        default = k["type"](env) if env not in (None, "") else f.default
        parser.add_argument(k["flag"], dest=f.name, type=k["type"], default=default, help=f"{k['help']} [{k['env']}]")
    return Config(**vars(parser.parse_args(argv)))


def resolve_token(cfg: Config, data_dir: Path) -> str:
    """The given token, or one kept (0600) in the data dir so a restart keeps browsers logged in."""
    if cfg.token:
        return cfg.token
    path = data_dir / "token"
    if path.exists():
        return path.read_text().strip()
    token = secrets.token_urlsafe(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token)
    return token


# -- access: token auth, host allow-list, same-origin writes, security headers ------------------

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# A Host header as RFC 9110 has it: a name, an IPv4 address or a bracketed IPv6 one, then perhaps a port.
# Anything else ("localhost:5099.evil.com", "evil.com@localhost", "localhost:evil") names no host of ours.
HOST_HEADER = re.compile(r"(?:\[(?P<ip6>[0-9a-fA-F:.]+)\]|(?P<name>[A-Za-z0-9._-]+))(?::[0-9]{1,5})?")
# HTML outputs are srcdoc frames (about:srcdoc, never fetched), which inherit this policy: scripts and
# inline styles inside them do not run, whatever the notebook says. Nothing else is framed.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "frame-src about:; connect-src 'self'; object-src 'none'; base-uri 'none'; "
       "form-action 'self'; frame-ancestors 'none'")
SECURITY_HEADERS = ((b"content-security-policy", CSP.encode()), (b"x-content-type-options", b"nosniff"),
                    (b"referrer-policy", b"no-referrer"), (b"x-frame-options", b"DENY"),
                    (b"cross-origin-opener-policy", b"same-origin"), (b"cross-origin-resource-policy", b"same-origin"))


def too_large(cfg: Config) -> str:
    return (f"The request body is over {cfg.max_body:,} bytes; send less, or start Loopbook with a larger "
            "--max-body.")


def session_cookie(cfg: Config) -> str:
    # Browsers keep cookies per host, not per port: the port in the name keeps two Loopbooks on one machine
    # from overwriting each other's login (it does not hide the cookie from other ports; SECURITY.md says so).
    return f"loopbook_session_{cfg.port}"


def session_seconds(cfg: Config) -> int:
    return max(1, int(cfg.session_hours * 3600))


class Sessions:
    """Browser logins: a random id per login, kept in this process only (a restart logs every browser out),
    each with a fixed expiry, all dropped when the token they were made under is no longer the token.
    Nothing about an id derives from the token. Ids are looked up by their SHA-256, so a lookup's timing
    says nothing about the ids held."""

    PREFIX = "lbs_"  # recognisable, so a dataset export can scrub one pasted into a cell
    MAX = 1000  # logins kept; the oldest go first (each needs the token, so this is no one else's lever)

    def __init__(self):
        self._expiry: dict[bytes, float] = {}
        self._token = b""

    @staticmethod
    def _key(value: str) -> bytes:
        return hashlib.sha256(value.encode("utf-8", "surrogateescape")).digest()

    def _bind(self, token: str) -> None:
        digest = self._key(token)
        if not hmac.compare_digest(digest, self._token):
            self._expiry.clear()
            self._token = digest

    def new(self, token: str, lifetime_s: float) -> str:
        self._bind(token)
        now = time.monotonic()
        for key in [k for k, t in self._expiry.items() if t <= now]:
            del self._expiry[key]
        while len(self._expiry) >= self.MAX:
            del self._expiry[next(iter(self._expiry))]
        sid = self.PREFIX + secrets.token_urlsafe(32)
        self._expiry[self._key(sid)] = now + lifetime_s
        return sid

    def valid(self, token: str, sid: str) -> bool:
        self._bind(token)
        if not sid.startswith(self.PREFIX) or len(sid) > 100:
            return False
        key = self._key(sid)
        expiry = self._expiry.get(key)
        if expiry is None:
            return False
        if expiry <= time.monotonic():
            del self._expiry[key]
            return False
        return True

    def drop(self, sid: str) -> bool:
        return self._expiry.pop(self._key(sid), None) is not None

    def __len__(self) -> int:
        return len(self._expiry)


class AccessMiddleware:
    """Plain ASGI, so static files, SSE and the API pass the same gate as the pages. `state`: the app's (its
    config, token, logins and workspace), filled by the time a request comes."""

    def __init__(self, app, state):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        started = False

        async def send_with_headers(message):
            nonlocal started
            if message["type"] in ("http.response.start", "websocket.http.response.start"):
                started = True
                ours = {k for k, _ in SECURITY_HEADERS}
                message["headers"] = [h for h in message.get("headers", []) if h[0].lower() not in ours] \
                    + list(SECURITY_HEADERS)
            await send(message)

        try:
            refusal = self.gate(scope)
        except Exception:  # noqa: BLE001 - whatever a header holds, the answer is a 4xx with our headers
            log.exception("Loopbook: the access check could not read a request's headers")
            refusal = JSONResponse({"error": "This request's headers could not be read; send well-formed "
                                             "headers."}, status_code=400)
        if scope["type"] == "websocket":
            # No route speaks WebSocket today; if one is added it passes the same gate. A refused handshake gets
            # the refusal with our headers where the server can send one, else a plain close.
            if refusal is None:
                return await self.app(scope, receive, send)
            if "websocket.http.response" in scope.get("extensions", {}):
                return await refusal(scope, receive, send_with_headers)
            return await send({"type": "websocket.close", "code": 1008})
        if refusal is not None:
            return await refusal(scope, receive, send_with_headers)
        try:
            await self.app(scope, self.limited(receive), send_with_headers)
        except Exception as exc:
            # Starlette answers an unhandled error outside this middleware, without the security headers:
            # answer it here instead (the traceback goes to the log, never to the client).
            if started:
                raise
            log.exception("Loopbook: an unhandled error in %s %s", scope.get("method"), scope.get("path"))
            await http_error(Request(scope), exc)(scope, receive, send_with_headers)

    def gate(self, scope) -> Response | None:
        """None to let the request through; else the answer that refuses it (a login sets its cookie here)."""
        req = Request({**scope, "type": "http", "method": "GET"} if scope["type"] == "websocket" else scope)
        problem = self.check(req)
        if problem is not None:
            return problem
        if scope["type"] == "websocket":
            if self.cross_site(req):  # a handshake is a GET, but what it opens can write
                return JSONResponse({"error": "Cross-site WebSocket refused."}, status_code=403)
            return None if self.authorised(req) else self.deny(req, "Log in first.")
        st, cookie = self.state, session_cookie(self.state.cfg)
        token = req.query_params.get("token")
        if token is not None and req.method == "GET":
            if not hmac.compare_digest(token.encode(), st.token.encode()):
                return self.deny(req, "That token is not valid.")
            query = urlencode([(k, v) for k, v in parse_qsl(scope.get("query_string", b"").decode("latin-1"))
                               if k != "token"])
            # One leading slash: "//evil.example/?token=..." must not become an off-site redirect.
            resp = RedirectResponse("/" + scope["path"].lstrip("/") + (f"?{query}" if query else ""), status_code=303)
            old = req.cookies.get(cookie)
            if old:
                st.sessions.drop(old)  # logging in again replaces this browser's login
            lifetime = session_seconds(st.cfg)
            resp.set_cookie(cookie, st.sessions.new(st.token, lifetime), max_age=lifetime, httponly=True,
                            samesite="strict", path="/")
            return resp
        if not self.authorised(req):
            return self.deny(req, "Log in with the URL Loopbook printed at start-up (it ends in ?token=...), "
                                  "or send 'Authorization: token ...'.")
        # No cookie goes further. FastHTML fills a handler's parameters from cookies before form fields, and
        # any page on this host may set cookies here (they ignore ports): a cookie named "source" would have
        # replaced the text a Run sends. The login is all the app needs, and it is checked above.
        scope["loopbook.session"] = req.cookies.get(cookie)
        scope["headers"] = [(k, v) for k, v in scope["headers"] if k.lower() != b"cookie"]
        return None

    def limited(self, receive):
        """Count body bytes as they arrive: a chunked body has no Content-Length to refuse up front."""
        seen, cfg = 0, self.state.cfg

        async def receive_limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > cfg.max_body:
                    raise HTTPException(413, too_large(cfg))
            return message
        return receive_limited

    def allowed_hosts(self) -> set[str]:
        cfg = self.state.cfg
        allowed = {*LOOPBACK_HOSTS, *(h.strip().strip("[]").lower() for h in cfg.allow_host.split(",") if h.strip())}
        if cfg.host not in ("0.0.0.0", "::"):
            allowed.add(cfg.host.strip("[]").lower())
        return allowed

    @staticmethod
    def cross_site(req: Request) -> bool:
        """A browser says where a request comes from: anything but this very origin is refused for writes.
        Same-site is not enough: another port on localhost is same-site, and SameSite cookies go there too."""
        if req.headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
            return True
        origin = req.headers.get("origin")
        if origin is None:
            return False
        try:
            parts = urlsplit(origin)
            netloc = parts.netloc.lower()
        except ValueError:  # e.g. "http://[::1": no browser sends that, so no page of ours did
            return True
        return (parts.scheme, netloc) != (req.url.scheme, req.headers.get("host", "").lower())

    def check(self, req: Request) -> Response | None:
        # Host allow-list: a DNS-rebinding page reaches us under its own name, so refuse unknown names.
        raw = req.headers.get("host", "")
        m = HOST_HEADER.fullmatch(raw)
        if m is None:
            return JSONResponse({"error": f"The Host header {raw[:100]!r} is not allowed: it is not a host name "
                                          "with an optional port."}, status_code=403)
        host = (m.group("ip6") or m.group("name")).lower()
        if host not in self.allowed_hosts():
            return JSONResponse({"error": f"Host {host!r} is not allowed; start Loopbook with --allow-host {host}."},
                                status_code=403)
        if req.method not in SAFE_METHODS:
            if self.cross_site(req):
                return JSONResponse({"error": "Cross-site request refused: changes come only from Loopbook's own "
                                              "pages or from clients that send no Origin."}, status_code=403)
            length = req.headers.get("content-length")
            if length and length.isascii() and length.isdigit() and int(length) > self.state.cfg.max_body:
                return JSONResponse({"error": too_large(self.state.cfg)}, status_code=413)
        return None

    def authorised(self, req: Request) -> bool:
        st = self.state
        auth = req.headers.get("authorization", "")
        scheme, _, value = auth.partition(" ")
        value = value.strip()
        if scheme.lower() in ("token", "bearer"):
            if hmac.compare_digest(value.encode(), st.token.encode()):
                return True
            dialog_id = dialog_of_kernel_token(st.token, value, self.dialog_born)
            if dialog_id is not None:
                req.scope["loopbook.kernel_dialog"] = dialog_id
                return self.kernel_may(req, dialog_id)
        sid = req.cookies.get(session_cookie(st.cfg))
        return bool(sid) and st.sessions.valid(st.token, sid)

    def dialog_born(self, dialog_id: int) -> str | None:
        """When a dialog was made (its kernel token is bound to it), or None when there is no such dialog."""
        try:
            return self.state.ws.store.get_dialog(dialog_id)["created_at"]
        except StoreError:
            return None

    def kernel_may(self, req: Request, dialog_id: int) -> bool:
        """A kernel's token reaches its own dialog's API: its messages and cells, nothing else."""
        path = req.url.path
        # ASCII digits, and few: \d takes other scripts' digits, and int() refuses more than 4,300 of them.
        if m := re.fullmatch(r"/api/dialogs/([0-9]{1,19})(/messages)?", path):
            return int(m.group(1)) == dialog_id and (m.group(2) is not None or req.method == "GET")
        if m := re.fullmatch(r"/api/messages/([0-9]+)(/run)?", path):
            try:
                return self.state.ws.store.get_message(m.group(1))["dialog_id"] == dialog_id
            except StoreError:
                return True  # let the route answer 404
        return False

    @staticmethod
    def deny(req: Request, message: str) -> Response:
        if req.url.path.startswith("/api/") or "text/html" not in req.headers.get("accept", ""):
            return JSONResponse({"error": message}, status_code=401)
        return HTMLResponse(f"<!doctype html><title>Loopbook: log in</title><p>{message}</p>", status_code=401)


# -- the app ---------------------------------------------------------------------------------------

HDRS = (
    Link(rel="stylesheet", href="/static/app.css"),
    Link(rel="stylesheet", href="/ansi.css"),
    Script(src="/static/vendor/htmx.min.js"),
    Script(src="/static/vendor/htmx-ext-sse.js"),
    Script(src="/static/vendor/codemirror.js"),
    Script(src="/static/keys.js"),
    Script(src="/static/editor.js"),
    Script(src="/static/app.js"),
)


def http_error(req: Request, exc: Exception):
    """Clean answers for errors raised before our handlers run (bad JSON, unknown routes, bad methods)."""
    if isinstance(exc, RecursionError):  # FastHTML parses JSON bodies before our handlers do
        exc = HTTPException(400, "The request body is nested too deeply; send a flat JSON object.")
    status = getattr(exc, "status_code", 500)
    detail = getattr(exc, "detail", None) if status != 500 else None
    detail = detail or {404: "Not found.", 405: "Method not allowed."}.get(
        status, "Loopbook hit an internal error (the server log has the traceback); please report it.")
    if req.url.path.startswith("/api/") or "text/html" not in req.headers.get("accept", ""):
        return JSONResponse({"error": str(detail)}, status_code=status)
    return PlainTextResponse(str(detail), status_code=status)


class AssetFiles(StaticFiles):
    """static/, minus the asset build folder (its node_modules is no business of the browser's)."""

    def lookup_path(self, path: str):
        if path.split("/", 1)[0] == "build":
            return "", None
        return super().lookup_path(path)


def route(method: str, path: str):
    """Mark a function as what answers `method path`; create_app adds every marked one, in the order of this file."""
    def mark(fn):
        fn.loopbook_route = (method, path)
        return fn
    return mark


def create_app(cfg: Config) -> FastHTML:
    """The app, its state on `app.state`: `cfg`, the logins (`sessions`), what an import changed (`flash`, shown
    once), and, from start-up on, the `token` and the workspace `ws` (the store, kernels and model)."""
    app = FastHTML(default_hdrs=False, hdrs=HDRS, lifespan=lifespan, sess_cls=None, secret_key=secrets.token_hex(16),
                   exception_handlers={s: http_error for s in (400, 404, 405, 413, 422, 500, RecursionError)},
                   title="Loopbook", htmlkw={"lang": "en"}, canonical=False)
    app.state.cfg, app.state.sessions, app.state.flash = cfg, Sessions(), {}
    app.add_middleware(AccessMiddleware, state=app.state)
    app.mount("/static", AssetFiles(directory=ROOT / "static"), name="static")
    for fn in [f for f in globals().values() if inspect.isfunction(f) and "loopbook_route" in vars(f)]:
        method, path = fn.loopbook_route
        app.route(path, methods=[method])(fn)
    return app


async def lifespan(app):
    st, cfg = app.state, app.state.cfg
    store = Store(cfg.data_dir)
    st.token = resolve_token(cfg, store.data_dir)
    pool = KernelPool(output_cap_chars=cfg.output_cap, default_timeout=cfg.exec_timeout or None,
                      cull_idle_s=cfg.cull_idle or None,
                      resource_limits={"memory_bytes": cfg.kernel_memory} if cfg.kernel_memory else None)
    store.recover_interrupted()
    models = Resident(cfg.model, cfg.backend, base_url=cfg.base_url, n_ctx=cfg.n_ctx, n_gpu_layers=cfg.n_gpu_layers,
                      data_dir=store.data_dir)
    # The app's own setting values, under each dialog's; a Solve attempt gets at most a minute by default.
    defaults = {k: getattr(cfg, k) for k in keys(ASK) + keys(LOOP) + ("tool_steps",) if hasattr(cfg, k)} | {
        "exec_timeout": min(cfg.exec_timeout or 60.0, 60.0)}
    st.ws = Workspace(store, pool, models, url=f"http://127.0.0.1:{cfg.port}", token=st.token,
                      kernel_cwd=cfg.kernel_cwd, defaults=defaults)
    await pool.start()
    loading = asyncio.create_task(load_model(models))
    try:
        yield
    finally:
        loading.cancel()
        await st.ws.close()


async def load_model(models: Resident):
    """Load the resident model in the background, so the page is up at once; say what was chosen."""
    try:
        engine = await models.get()
        m = engine.manifest
        print(f"Loopbook: model {m.get('model')} ({m.get('backend')}), {m.get('gpu') or 'CPU'}"
              + (f"; {m['note']}" if m.get("note") else ""), flush=True)
    except ModelError as e:
        print(f"Loopbook: no model loaded: {e}", flush=True)


# -- the JSON API ----------------------------------------------------------------------------------

def api(handler):
    """Turn store and input errors into clean JSON errors instead of tracebacks."""

    @functools.wraps(handler)
    async def wrapper(*args, **kwargs):
        try:
            result = handler(*args, **kwargs)
            if asyncio.iscoroutine(result):
                result = await result
            return result if isinstance(result, Response) else JSONResponse(result)
        except StoreError as e:
            return JSONResponse({"error": str(e)}, status_code=e.status)
        except ModelError as e:
            return JSONResponse({"error": f"Model: {e}"}, status_code=503)
        except (KernelStartError, KernelInitError) as e:
            return JSONResponse({"error": f"Kernel: {e}"}, status_code=503)
    return wrapper


async def json_body(req: Request) -> dict:
    raw = await req.body()
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidInput(f"The request body is not valid JSON: {e}.") from None
    except RecursionError:
        raise InvalidInput("The request body is nested too deeply; send a flat JSON object.") from None
    if not isinstance(data, dict):
        raise InvalidInput("The request body must be a JSON object.")
    check_unicode(data)
    return data


def check_unicode(data) -> None:
    """JSON may escape a lone surrogate ("\\ud800"); SQLite cannot store one, so refuse it up front."""
    bad = lone_surrogate(data)
    if bad is not None:
        raise InvalidInput(f"The request holds a lone surrogate ({bad!r}), which is not valid Unicode text; send UTF-8 "
                           "text.")


def message_json(m: dict) -> dict:
    return {k: m[k] for k in ("id", "dialog_id", "position", "type", "source", "outputs", "output_meta",
                              "execution_count", "reply", "reply_meta", "pinned", "skipped", "is_test",
                              "author", "version", "created_at", "updated_at")}


def wants_events(req: Request) -> bool:
    return "text/event-stream" in req.headers.get("accept", "")


def event_stream(events) -> Response:
    """One SSE answer: `events` yields (event, data, id). Each line of data goes in a data: line of its own, so
    newlines inside tokens survive the trip; the id lets a reconnecting EventSource resume (Last-Event-ID)."""
    async def encoded():
        async for event, data, n in events:
            yield f"id: {n}\nevent: {event}\n" + "".join(f"data: {line}\n" for line in data.split("\n")) + "\n"
    resp = EventStream(encoded())
    resp.headers["Cache-Control"] = "no-cache"
    return resp


def last_event_id(req: Request) -> int:
    """Where a reconnecting EventSource left off, so it is not sent the same tokens twice."""
    value = req.headers.get("last-event-id") or "0"
    # ASCII digits only: str.isdigit() also takes "²", which int() refuses.
    return int(value) if re.fullmatch(r"[0-9]{1,11}", value) else 0


def dialog_file(ws: Workspace, id: str, fmt: str) -> Response:
    text, media, name = export_dialog(ws.store, id, fmt)
    return Response(text, media_type=media, headers={"Content-Disposition": f'attachment; filename="{name}"'})


@route("POST", "/api/dialogs")
@api
async def api_create_dialog(state, req: Request):
    body = await json_body(req)
    return {"id": state.ws.new_dialog(body.get("title", "Untitled"))["id"]}


@route("GET", "/api/dialogs")
@api
def api_list_dialogs(state, q: str = ""):
    return [{k: d[k] for k in ("id", "title", "created_at", "updated_at", "n_messages", "parent_id")}
            for d in state.ws.store.list_dialogs(search=q or None)]


@route("GET", "/api/dialogs/{id}")
@api
def api_get_dialog(state, id: str):
    ws = state.ws
    d = ws.store.get_dialog(id)
    return {**d, "kernel": ws.kernel_state(d["id"]), "messages": [message_json(m) for m in ws.store.messages(d["id"])]}


@route("PATCH", "/api/dialogs/{id}")
@api
async def api_change_dialog(state, id: str, req: Request):
    body = await json_body(req)
    return state.ws.change_dialog(id, **{k: body[k] for k in ("title", "settings") if k in body})


@route("DELETE", "/api/dialogs/{id}")
@api
async def api_delete_dialog(state, id: str):
    return {"deleted": await state.ws.delete_dialog(id)}


@route("GET", "/api/dialogs/{id}/export")
@api
def api_export_dialog(state, id: str, format: str = "ipynb"):
    return dialog_file(state.ws, id, format)


def export_options(store: Store, params: list[tuple[str, object]]):
    """The export CLI's options from a request, but for one: the tokenizer is a registered model's name
    (`tokenizer=smollm2-135m`), never a path, so no request makes the server open a file of its choosing."""
    names = ", ".join([*MODELS, *ALIASES])
    kept, tokenizer = [], None
    for key, value in params:
        name = str(key).replace("-", "_")
        if name == "tokenizer_gguf":
            raise InvalidInput(f"tokenizer_gguf takes a file path, which only the command line may give; send "
                               f"tokenizer=<model name> instead (one of {names}).")
        if name == "tokenizer":
            tokenizer = value
        else:
            kept.append((key, value))
    if tokenizer is None:
        if any(str(k).replace("-", "_") == "max_tokens_per_row" and v not in (None, "") for k, v in kept):
            raise InvalidInput(f"max_tokens_per_row needs a tokenizer: send tokenizer=<model name> too (one of "
                               f"{names}; only its vocabulary is loaded).")
    else:
        if not isinstance(tokenizer, str) or canonical_name(tokenizer) is None:
            raise InvalidInput(f"tokenizer must be the name of a registered model ({names}); got "
                               f"{str(tokenizer)[:80]!r}.")
        try:
            kept.append(("tokenizer_gguf", str(resolve_model(tokenizer, store.data_dir).path)))
        except ModelError as e:
            raise InvalidInput(f"tokenizer {tokenizer}: {e}") from None
    try:
        return options_from_mapping(kept)
    except ExportError as e:
        raise InvalidInput(str(e)) from None


@route("POST", "/api/export")
@api
async def api_export_dataset(state, req: Request):
    """The traces as a dataset: a zip of JSONL files per format and split, plus the dataset card. Options are the
    export CLI's flags, as query parameters, form fields or a JSON object. A POST, not a GET: it does real work,
    and an <img> in a note or another site's link must not be able to start one."""
    params = list(req.query_params.multi_items())
    kind = req.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind in ("application/x-www-form-urlencoded", "multipart/form-data"):
        params += [(k, v) for k, v in (await req.form()).multi_items() if isinstance(v, str)]
    else:
        params += list((await json_body(req)).items())
    opts = await asyncio.to_thread(export_options, state.ws.store, params)
    try:
        chunks, _report = await asyncio.to_thread(stream_export_zip, state.ws.store, opts, secrets=[state.token])
    except ExportError as e:
        raise InvalidInput(str(e)) from None
    return StreamingResponse(chunks, media_type="application/zip",
                             headers={"Content-Disposition": 'attachment; filename="loopbook-dataset.zip"'})


@route("GET", "/api/export")
@api
def api_refuse_export_by_get():
    return JSONResponse({"error": "The dataset export is a POST (with the same options as query parameters, form "
                                  "fields or a JSON object): a GET must not start work that an <img> could trigger."},
                        status_code=405, headers={"Allow": "POST"})


@route("POST", "/api/dialogs/import")
@api
async def api_import_notebook(state, req: Request, title: str = ""):
    d = state.ws.import_notebook(await req.body(), title or None)
    return {"id": d["id"], "title": d["title"], "n_messages": d["n_messages"], "notices": d["notices"]}


@route("POST", "/api/dialogs/{id}/duplicate")
@api
async def api_duplicate_dialog(state, id: str, req: Request):
    body = await json_body(req)
    return {"id": state.ws.store.duplicate_dialog(id, body.get("title"))["id"]}


@route("POST", "/api/dialogs/{id}/messages")
@api
async def api_add_message(state, id: str, req: Request):
    body = await json_body(req)
    m = state.ws.store.add_message(id, body.get("type", "code"), body.get("source", ""),
                                   after=body.get("after"), before=body.get("before"))
    return {"id": m["id"], "position": m["position"], "version": m["version"]}


@route("GET", "/api/messages/{id}")
@api
def api_get_message(state, id: str):
    return message_json(state.ws.store.get_message(id))


@route("PATCH", "/api/messages/{id}")
@api
async def api_edit_message(state, id: str, req: Request):
    body = await json_body(req)
    return message_json(state.ws.cells.edit(id, body))


@route("DELETE", "/api/messages/{id}")
@api
def api_delete_message(state, id: str):
    return {"deleted": state.ws.cells.delete(id)}


@route("POST", "/api/messages/{id}/move")
@api
async def api_move_message(state, id: str, req: Request):
    body = await json_body(req)
    m = state.ws.store.move_message(id, after=body.get("after"), before=body.get("before"), offset=body.get("offset"))
    return {"id": m["id"], "position": m["position"]}


@route("POST", "/api/messages/{id}/run")
@api
async def api_run_message(state, id: str, req: Request):
    return await state.ws.run(id, from_kernel=req.scope.get("loopbook.kernel_dialog") is not None)


@route("POST", "/api/messages/{id}/ask")
@api
async def api_ask_prompt(state, id: str, req: Request):
    body = await json_body(req)
    m, live, task = await state.ws.ask(id, body)
    if wants_events(req):
        async def events():
            n = 0
            async for batch in live.follow():
                for ev in batch:
                    n += 1
                    if ev["type"] == "token":
                        yield "token", json.dumps({"text": ev["text"]}), n
                    elif ev["type"] in ("tool", "note"):
                        yield ev["type"], json.dumps({k: v for k, v in ev.items() if k != "type"}), n
            res = await task
            yield "done", json.dumps({"reply": res.reply, "status": res.status, "error": res.error,
                                      "figures": res.figures, "manifest": res.manifest, "notes": res.notes,
                                      "tools": res.tools}), n + 1
        return event_stream(events())
    res = await task
    out = {"reply": res.reply, "status": res.status, "figures": res.figures, "manifest": res.manifest,
           "notes": res.notes, "tools": res.tools}
    if res.status == "error":
        return JSONResponse({**out, "error": res.error}, status_code=422)
    return out


@route("POST", "/api/messages/{id}/stop")
@api
async def api_stop_message(state, id: str):
    return {"stopped": await state.ws.stop(id)}


async def loop_response(state, req: Request, id: str, kind: str):
    """Solve or Fix: the summary when it is done, or its events as they come (SSE)."""
    body = await json_body(req)
    m, live, task = await state.ws.solve(id, body, kind)
    if wants_events(req):
        async def events():
            n = 0
            async for batch in live.follow():
                for ev in batch:
                    n += 1
                    yield ev["type"], json.dumps(ev), n
        return event_stream(events())
    return await task


@route("POST", "/api/messages/{id}/solve")
@api
async def api_solve_prompt(state, id: str, req: Request):
    return await loop_response(state, req, id, "solve")


@route("POST", "/api/messages/{id}/fix")
@api
async def api_fix_cell(state, id: str, req: Request):
    return await loop_response(state, req, id, "fix")


@route("GET", "/api/traces/{id}")
@api
def api_get_trace(state, id: str):
    return state.ws.traces.get_trace(id)


@route("GET", "/api/messages/{id}/traces")
@api
def api_message_traces(state, id: str):
    ws = state.ws
    return [{k: t[k] for k in ("id", "kind", "status", "stop_reason", "rounds", "n_attempts", "code_message_id",
                               "created_at", "finished_at")}
            for t in ws.traces.traces_for_message(ws.store.get_message(id)["id"])]


@route("GET", "/api/model")
@api
def api_model_status(state):
    return state.ws.model_status()


@route("POST", "/api/dialogs/{id}/interrupt")
@api
async def api_interrupt_dialog(state, id: str):
    return {"kernel": state.ws.kernel_state(await state.ws.interrupt(id))}


@route("POST", "/api/dialogs/{id}/restart")
@api
async def api_restart_kernel(state, id: str):
    return {"kernel": state.ws.kernel_state(await state.ws.restart(id))}


@route("POST", "/api/dialogs/{id}/complete")
@api
async def api_complete(state, id: str, req: Request):
    """Completion from the dialog's kernel (the page's Tab): {"code", "cursor_pos"} in code points."""
    return await state.ws.complete(id, await json_body(req))


@route("POST", "/api/dialogs/{id}/inspect")
@api
async def api_inspect(state, id: str, req: Request):
    """Help from the dialog's kernel (the page's Shift+Tab): {"code", "cursor_pos"} in code points."""
    return await state.ws.inspect(id, await json_body(req))


@route("POST", "/api/dialogs/{id}/ghost")
@api
async def api_ghost(state, id: str, req: Request):
    """The model's ghost text at a cell's cursor (the page's pause or Alt+.): {"message_id", "text", "cursor"} in
    code points; answers {"status", "text", "id", "message", "figures"} (status busy, loading, no_model or
    unsupported: nothing to show, and why)."""
    return await ghost_text(state.ws, id, await json_body(req), max_tokens=state.cfg.ghost_max_tokens)


@route("POST", "/api/dialogs/{id}/ghost/outcome")
@api
async def api_ghost_outcome(state, id: str, req: Request):
    """What became of a ghost text: {"id", "outcome": accepted | edited | dropped, "final"}."""
    return decide_ghost(state.ws, id, await json_body(req))


@route("GET", "/api/dialogs/{id}/tokens")
@api
def api_token_meter(state, id: str):
    """The token meter: {"n_ctx", "budget", "used", "estimated", "cells": {id: tokens}, "prompts": {id: {"tokens",
    "dropped": [ids]}}, ...}."""
    return state.ws.tokens(id)


@route("GET", "/api/dialogs/{id}/kernel")
@api
def api_kernel_state(state, id: str):
    ws = state.ws
    did = ws.store.get_dialog(id)["id"]
    return {"state": ws.kernel_state(did), "info": ws.kernel_info(did)}
# -- cells: the fast string renderer ----------------------------------------------------------------
# Cells are rendered here, as plain strings, not FastHTML elements: a 1,000-cell dialog must render in well
# under 300 ms, and building ~18 elements per cell as FT objects took 2.6 s (profiled). Every value that
# reaches the markup goes through `_e` (escape) or the sanitizing renderers of dialog.render, and every
# renderer of this section returns Safe markup. Cells carry no hx-* attributes: static/app.js drives them
# (keys and toolbar), so htmx has nothing to process when a long dialog opens.

COLLAPSE_LINES = 40      # outputs longer than this many lines, or
COLLAPSE_CHARS = 4096    # this many characters, show their head and a "show all" button:
HEAD_LINES = 20          # this many lines of it,
HEAD_CHARS = 2048        # at most this many characters
_BASE64 = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=\n\r ")


def _e(value) -> str:
    return escape("" if value is None else str(value), quote=True)


# Stored metadata is read as data, never trusted for its type: an imported file, an older store or the API may
# have put anything there, and a page that cannot render would hide the whole dialog.
def _number(value) -> float | int | None:
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) else None


def _text_or(value, default: str | None = None) -> str | None:
    return value if isinstance(value, str) else default


@functools.lru_cache(maxsize=4096)
def _md_cached(text: str) -> str:
    return markdown_html(text)


@functools.lru_cache(maxsize=4096)
def _ansi_cached(text: str) -> str:
    return ansi_html(text)


def _md(text: str) -> str:
    """Sanitized markdown; small texts are cached, since a page shows the same notes again and again."""
    return _md_cached(text) if len(text) <= 20_000 else markdown_html(text)


def _ansi(text: str) -> str:
    if "\x1b" not in text:
        return escape(text, quote=False)  # what ansi2html gives for plain text, 4x faster
    return _ansi_cached(text) if len(text) <= 20_000 else ansi_html(text)


def _clip(text: str) -> tuple[str, int]:
    """The head of a long text (HEAD_LINES lines, HEAD_CHARS characters) and its line count, or the text
    and 0 when it is short enough to show whole."""
    if len(text) <= COLLAPSE_CHARS and text.count("\n") <= COLLAPSE_LINES:
        return text, 0
    head = text[:HEAD_CHARS]
    cut = -1
    for _ in range(HEAD_LINES):
        cut = head.find("\n", cut + 1)
        if cut < 0:
            break
    if cut >= 0:
        head = head[:cut + 1]
    return head, text.count("\n") + (not text.endswith("\n"))


def _size(n: int) -> str:
    return f"{n:,} characters" if n < 10_000 else f"{n / 1024:,.0f} KB"


def _frame_height(html: str) -> int:
    """A starting height class (1..8, 60 px each) for an HTML output; the frame is resizable from there.
    A sandboxed frame without allow-same-origin cannot be measured from the page, and under the page's
    CSP (which srcdoc frames inherit) it cannot run a script to report its size."""
    low = html.lower()
    rows = 1 + sum(low.count(tag) for tag in ("<tr", "<br", "<li", "<p", "<h", "<div")) + html.count("\n") // 3
    return max(1, min(8, (rows * 22 + 20) // 60 + 1))


def OutputView(o: dict, mid: int = 0, n: int = 0, full: bool = False) -> Safe:
    """One nbformat output; long text collapsed unless `full`."""
    return Safe(_output(o, mid, n, full))


def _output(o: dict, mid: int, n: int, full: bool) -> str:
    kind = o.get("output_type")
    data = o.get("data") or {}
    if kind == "stream":
        cls, text = f"out out-stream out-{_e(o.get('name') or 'stdout')}", text_of(o.get("text"))
    elif kind == "error":
        cls = "out out-error"
        text = "\n".join(o.get("traceback") or [f"{o.get('ename')}: {o.get('evalue')}"])
    else:
        for mime in IMAGE_MIMES:
            if mime in data:
                b64 = text_of(data[mime]).strip()
                if not set(b64) <= _BASE64:
                    return '<pre class="out out-result">(an image output that is not valid base64)</pre>'
                return (f'<div class="out out-image"><img src="data:{mime};base64,{_e(b64)}" '
                        f'alt="image output" loading="lazy"></div>')
        if "image/svg+xml" in data:
            svg = base64.b64encode(text_of(data["image/svg+xml"]).encode()).decode()
            return f'<div class="out out-image"><img src="data:image/svg+xml;base64,{svg}" alt="svg output"></div>'
        if "text/html" in data:
            html = text_of(data["text/html"])
            # An empty sandbox: an opaque origin, no scripts, forms or navigation. Scripts could not run anyway
            # (srcdoc frames inherit the page's CSP), and a frame allowed to run them could load our own
            # /static scripts as gadgets.
            return (f'<div class="out-frame h{_frame_height(html)}"><iframe class="out out-html" sandbox="" '
                    f'srcdoc="{_e(html)}" title="HTML output" loading="lazy"></iframe></div>')
        if "text/markdown" in data:
            return f'<div class="out out-markdown md">{_md(text_of(data["text/markdown"]))}</div>'
        cls, text = "out out-result", text_of(data.get("text/plain", ""))
    shown, lines = (text, 0) if full else _clip(text)
    if full and _clip(text)[1]:
        cls += " out-all"  # shown whole on request: it scrolls inside a frame of its own
    pre = f'<pre class="{cls}">{_ansi(shown)}</pre>'
    if not lines:
        return pre
    return (f'<div class="out-collapsed" data-n="{n}">{pre}<button type="button" class="show-all" data-act="show-all" '
            f'data-url="/cells/{mid}/output/{n}">Show all {lines:,} lines ({_size(len(text))})</button></div>')


def Outputs(m: dict, running: bool = False) -> Safe:
    """A code cell's outputs; `running`: its run goes on now, and the page follows its live outputs."""
    live = ' data-live="run"' if running else ""
    meta = m.get("output_meta") if isinstance(m.get("output_meta"), dict) else {}
    status = _text_or(meta.get("status"))
    parts = []
    if status in ("timeout", "died", "interrupted") and meta.get("message"):
        parts.append(f'<div class="out-banner out-{_e(status)}">{_e(meta["message"])}</div>')
    parts.extend(_output(o, m["id"], n, False) for n, o in enumerate(m.get("outputs") or []) if isinstance(o, dict))
    if meta.get("truncated"):
        produced = _number(meta.get("original_chars"))
        parts.append('<div class="out-banner out-truncated">Output capped: '
                     + (f"{int(produced):,} characters produced, " if produced is not None else "")
                     + 'head and tail kept.</div>')
    return Safe(f'<div id="out-{m["id"]}" class="outputs status-{_e(status or "none")}"{live}>{"".join(parts)}</div>')


def live_outputs(mid: int, cleared: bool, changed: list[int], outputs: list[dict]) -> str:
    """One live-output event for the page: the outputs that changed, rendered as a finished run's are (Outputs),
    by index; static/app.js puts each at its place and drops those past `n` (the view after clear_output)."""
    return json.dumps({"clear": cleared, "n": len(outputs),
                       "set": [[i, _output(outputs[i], mid, i, False)] for i in changed]})


def ExecCount(m: dict) -> Safe:
    count = m.get("execution_count")
    return Safe(f'<span class="exec-count">[{_e(count) if count is not None else "&nbsp;"}]</span>')


def Figures(meta: dict) -> Safe:
    f = meta.get("figures")
    if not isinstance(f, dict) or not f:
        return Safe("")
    ttft, tps, prompt, cached, generated = (_number(f.get(k)) for k in (
        "ttft_s", "tokens_per_s", "prompt_tokens", "cached_prompt_tokens", "completion_tokens"))
    bits = [(_text_or(meta.get("model")) or "").strip(),
            f"TTFT {ttft:.2f} s" if ttft is not None else "",
            f"{tps:.1f} tok/s" if tps else "",
            f"{int(prompt)} prompt tokens, {int(cached or 0)} cached" if prompt is not None else "",
            f"{int(generated)} generated" if generated is not None else ""]
    return Safe(f'<div class="figures">{_e(" · ".join(b for b in bits if b))}</div>')


TOOL_RESULT_SHOWN = 2_000  # characters of a tool's result in the page (the model got up to tools.RESULT_CHARS)


def Reply(m: dict, streaming: bool = False) -> Safe:
    meta = m.get("reply_meta") if isinstance(m.get("reply_meta"), dict) else {}
    mid = m["id"]
    if streaming:
        return Safe(to_xml(Div(
            Div(Span("Answering", cls="live-note"), Button("Stop", type="button", data_act="stop", cls="stop"),
                cls="reply-bar"),
            Pre(cls="reply-live", sse_swap="token", hx_swap="beforeend"),
            Div(sse_swap="done", hx_target=f"#reply-{mid}", hx_swap="outerHTML"),
            id=f"reply-{mid}", cls="reply streaming", hx_ext="sse", sse_connect=f"/cells/{mid}/stream",
            sse_close="done"), indent=False))
    status = _text_or(meta.get("status"), "done")
    tools = ToolSteps(meta)
    if not m.get("reply") and not tools and status not in ("error", "interrupted", "cancelled"):
        return Safe(f'<div id="reply-{mid}" class="reply empty"></div>')
    notes = {"interrupted": "The server stopped while this reply was being written; it is incomplete.",
             "cancelled": "Stopped.", "error": f"The model failed: {meta.get('error')}"}
    note = f'<div class="reply-note note-{_e(status)}">{_e(notes[status])}</div>' if status in notes else ""
    return Safe(
        f'<div id="reply-{mid}" class="reply status-{_e(status)}">{note}{tools}<div class="md">{_md(m.get("reply") or "")}</div>'
        f'<div class="reply-foot"><span><button type="button" data-act="extract" class="extract" tabindex="-1" '
        f'title="Put the reply\'s code blocks in new code cells">Code to cells</button> '
        f'<button type="button" data-act="edit-reply" class="edit-reply" tabindex="-1" '
        f'title="Edit the reply by hand (the model sees your version from now on)">Edit reply</button></span>'
        f'{Figures(meta)}</div></div>')


def ToolSteps(meta: dict) -> str:
    """A reply's `$`name`` notes and its tool calls with their results (reply_meta "refs" and "tools"), as HTML."""
    refs = meta.get("refs") if isinstance(meta.get("refs"), dict) else {}
    tools = meta.get("tools") if isinstance(meta.get("tools"), dict) else {}
    notes = [n for n in (refs.get("notes") or []) + [tools.get("note")] if isinstance(n, str) and n]
    calls = [c for st in tools.get("steps") or [] if isinstance(st, dict) for c in st.get("calls") or []
             if isinstance(c, dict)]
    html = "".join(f'<div class="reply-note note-refs">{_e(n)}</div>' for n in notes)
    if calls:
        items = "".join(
            f'<li class="tool-call status-{_e(str(c.get("status")))}"><code>{_e(call_label(c))}</code> '
            f'<span class="tool-status">{_e(str(c.get("status")))}</span>'
            f'<pre class="tool-result">{_e(str(c.get("result") or "")[:TOOL_RESULT_SHOWN])}</pre></li>' for c in calls)
        html += (f'<details class="tool-steps" open><summary>{len(calls)} tool call{"s" * (len(calls) != 1)}'
                 f'</summary><ol>{items}</ol></details>')
    return html


def tool_event_text(ev: dict) -> str:
    """A tool call or a note, as a line of the live reply."""
    if ev["type"] == "note":
        return f"\n[{ev['text']}]\n"
    return f"\n→ {call_label(ev)}: {ev.get('status')}: {str(ev.get('result') or '')[:TOOL_RESULT_SHOWN]}\n"


def ReplyEditor(m: dict):
    return Div(Textarea(m.get("reply") or "", name="reply", cls="reply-source", rows=max(4, (m.get("reply") or "").count("\n") + 2),
                        aria_label="Reply"),
               Div(Button("Save reply", type="button", data_act="save-reply", cls="save-reply"),
                   Button("Cancel", type="button", data_act="cancel-reply", cls="cancel-reply"), cls="reply-foot"),
               id=f"reply-{m['id']}", cls="reply editing")


STATUS_WORDS = {"ok": "passed", "error": "error", "timeout": "timed out", "died": "kernel died",
                "interrupted": "interrupted", "no_code": "no code", "syntax_error": "syntax error",
                "check_failed": "check failed"}


def AttemptLine(a: dict) -> Safe:
    what = STATUS_WORDS.get(a.get("exec_status"), a.get("exec_status"))
    detail = f": {a.get('ename')}: {a.get('evalue')}" if a.get("ename") else ""
    who = " (your code)" if a.get("author") == "human" else ""
    sel = a.get("selection") if isinstance(a.get("selection"), dict) else None
    head = f"round {a['round']}" + (f" · candidate {a['candidate']}" if a.get("candidate") or sel else "") + who
    if a.get("fresh") or (sel or {}).get("fresh"):
        head += " · fresh sample of the task"
    mark = ""
    if sel:
        place = f"group {sel['group'] + 1}" if isinstance(sel.get("group"), int) else "dropped out"
        mark = (f'<span class="attempt-group{" chosen" if sel.get("chosen") else ""}">'
                f'{_e(place)}{" · chosen" if sel.get("chosen") else ""}</span>')
    return Safe(f'<li class="attempt"><span class="attempt-round">{_e(head)}</span><span class="attempt-status '
                f'st-{_e(a.get("exec_status"))}">{_e(f"{what}{detail}")}</span>{mark}</li>')


def SelectionLine(rnd: int, sel: dict) -> Safe:
    """A round's selection by execution: the groups of candidates that behaved alike, the winner and why."""
    groups = sel.get("groups") or []
    shown = " ".join("{" + ", ".join(str(k) for k in g) + "}" for g in groups) or "none survived"
    winner = sel.get("winner")
    won = f"candidate {winner} chosen" if winner is not None else "no winner"
    inputs = sel.get("inputs")
    n_inputs = len(inputs) if isinstance(inputs, list) else sel.get("n_inputs")
    on = f" on {n_inputs} shared input{'s' if n_inputs != 1 else ''}" if n_inputs else ""
    return Safe(f'<li class="selection"><span class="attempt-round">round {_e(rnd)} · selection</span>'
                f'<span>groups{_e(on)}: {_e(shown)} → {_e(won)}: {_e(sel.get("reason") or "")}</span></li>')


def NoteLine(text: str) -> Safe:
    return Safe(f'<li class="loop-note-line">{_e(text)}</li>')


def attempt_lines(attempts: list[dict]) -> str:
    """The attempts in order, each batched round followed by its selection line."""
    out = []
    for i, a in enumerate(attempts):
        out.append(AttemptLine(a))
        sel = a.get("selection") if isinstance(a.get("selection"), dict) else None
        nxt = attempts[i + 1] if i + 1 < len(attempts) else None
        if sel and (nxt is None or nxt["round"] != a["round"] or not nxt.get("selection")):
            out.append(SelectionLine(a["round"], sel))
    return "".join(out)


def CostLine(cost: dict) -> str:
    """What a Solve or Fix spent, beside its verdict."""
    if not cost.get("attempts"):
        return ""
    gens = cost.get("generations", cost["attempts"])
    parts = [f"{cost['completion_tokens']:,} tokens generated in {gens} generation{'s' if gens != 1 else ''}",
             f"{cost['prompt_tokens_read']:,} prompt tokens read", f"model {cost['model_s']:.1f} s",
             f"code {cost['exec_s']:.1f} s"]
    return f'<div class="loop-cost">Spent: {_e(" · ".join(parts))}</div>'


def LoopView(ws: Workspace, m: dict, streaming: bool = False, trace: dict | None | bool = False) -> Safe:
    """The attempts of the latest Solve/Fix on this cell, collapsed; live while the loop runs.
    `trace`: that trace when the caller looked it up already (None: there is none)."""
    mid = m["id"]
    if streaming:
        return Safe(to_xml(Div(
            Div(Span("Solving: model code runs in this dialog's kernel", cls="loop-note live-note"),
                Button("Stop", type="button", data_act="stop", cls="stop"), cls="reply-bar"),
            Ul(cls="attempts live", sse_swap="attempt", hx_swap="beforeend"),
            Pre(cls="reply-live", sse_swap="token", hx_swap="beforeend"),
            Div(cls="outputs loop-outputs", sse_swap="outputs", hx_swap="innerHTML"),
            Div(sse_swap="done", hx_target=f"#cell-{mid}", hx_swap="outerHTML"),
            id=f"loop-{mid}", cls="loop streaming", hx_ext="sse", sse_connect=f"/cells/{mid}/loop-stream",
            sse_close="done"), indent=False))
    t = ws.latest_trace(mid) if trace is False else trace
    if not t:
        return Safe(f'<div id="loop-{mid}" class="loop empty"></div>')
    verdict = {"passed": "passed", "failed": "did not pass", "stopped": "stopped",
               "interrupted": "interrupted", "running": "running"}.get(t["status"], t["status"])
    reason = {"budget": "round budget spent", "no_progress": "same error twice", "no_code": "no code twice",
              "stopped": "stopped", "passed": ""}.get(t.get("stop_reason") or "", "")
    head = f"{t['kind'].capitalize()} {verdict} after {t['n_attempts']} attempt{'s' if t['n_attempts'] != 1 else ''}" \
        + (f" ({reason})" if reason else "")
    rows = ws.traces.attempts(t["id"])
    return Safe(f'<div id="loop-{mid}" class="loop status-{_e(t["status"])}"><details><summary>{_e(head)}<a '
                f'href="/traces/{_e(t["id"])}" class="trace-link">trace</a></summary><ul class="attempts">'
                f'{attempt_lines(rows)}</ul>{CostLine(ws.traces.spent(rows))}</details></div>')


def TokenCount(n: int, estimated: bool) -> str:
    """The tokens a cell adds to the model's context (a skipped cell: what it would add); ≈ when estimated.
    No title per cell: 1,000 of them weigh; the header meter's title says what the numbers are."""
    return f'<span class="tokens">{"≈" if estimated else ""}{n:,} tok</span>'


def cell_label(n: int, m: dict) -> str:
    first = (m.get("source") or "").lstrip()[:200].partition("\n")[0].strip()
    return f"#{n} {m['type']}" + (f" “{first[:40]}{'…' if len(first) > 40 else ''}”" if first else "")


BUDGET_NAMES = 8  # cells a budget note names; the rest are counted


def BudgetNote(mid: int, plan: dict | None, meter: dict | None, messages: list[dict] | None, *,
               oob: bool = False) -> str:
    """Under a prompt: when its context is over the budget, the cells that will be left out (before it is sent)."""
    attrs = f'id="budget-{mid}" class="budget"' + (' hx-swap-oob="true"' if oob else "")
    if not plan or not plan["dropped"] or not meter:
        return f'<div {attrs}></div>'
    dropped = plan["dropped"]
    shown = set(dropped[:BUDGET_NAMES])
    names = []
    for n, m in enumerate(messages or [], 1):  # the oldest go first: they are near the top
        if len(names) == len(shown):
            break
        if m["id"] in shown:
            names.append(cell_label(n, m))
    more = f"; and {len(dropped) - len(names):,} more" if len(dropped) > len(names) else ""
    return (f'<div {attrs} role="note"><strong>Over the context budget</strong>: {plan["tokens"]:,} of '
            f'{meter["budget"]:,} tokens ({meter["n_ctx"]:,} less {meter["max_tokens"]:,} for the reply). '
            f'{len(dropped):,} cell{"s" if len(dropped) != 1 else ""} will be left out, oldest first (pin a cell to '
            f'keep it): <span class="dropped">{_e("; ".join(names) + more)}</span></div>')


def ContextMeter(meter: dict, *, oob: bool = False) -> str:
    """The header's meter: the dialog's context (system prompt and every cell not skipped) against n_ctx."""
    approx = "≈" if meter["estimated"] else ""
    over = meter["used"] > meter["budget"]
    title = (f"Tokens the model would read for a prompt at the end: {meter['used']:,} of a {meter['n_ctx']:,}-token "
             f"context ({meter['budget']:,} after {meter['max_tokens']:,} for the reply). Each cell's gutter shows "
             "the tokens it adds (a skipped cell: what it would add)"
             + ("; estimated, about 4 characters a token: no model is loaded" if meter["estimated"] else ""))
    oob_attr = ' hx-swap-oob="true"' if oob else ""
    return (f'<span id="context-meter" class="context-meter{" over" if over else ""}" title="{_e(title)}"'
            f'{oob_attr}>context {approx}{meter["used"]:,} / {meter["n_ctx"]:,}</span>')


def Cell(ws: Workspace, m: dict, *, reply_streaming: bool = False, loop_streaming: bool = False,
         trace: dict | None | bool = False, lazy: bool = False, meter: dict | None = None,
         messages: list[dict] | None = None) -> Safe:
    """One cell as the page shows it. `trace`: its latest Solve/Fix trace, when the caller batched the lookup.
    `lazy`: its editor is made when it nears the screen (static/app.js), not when the page loads. `meter`,
    `messages`: the dialog's token meter and cells, when the caller has them (a whole page)."""
    mid, t, src = m["id"], m["type"], m["source"]
    lang = "python" if t == "code" else "markdown"
    flags = [f for f in ("pinned", "skipped") if m.get(f)] + (["test"] if m.get("is_test") else [])
    if meter is None and t == "prompt":  # one cell on its own: its budget needs the dialog's cells
        try:
            messages = ws.store.messages(m["dialog_id"])
            meter = ws.meter.dialog(ws.store.get_dialog(m["dialog_id"]), messages)
        except StoreError:
            meter = None
    if meter is not None and mid in meter["cells"]:
        tokens, estimated = meter["cells"][mid], meter["estimated"]
    else:
        counter = ws.meter.counter()
        tokens, estimated = ws.meter.cell_tokens(m, counter), counter[2]
    gutter = ExecCount(m) if t == "code" else f'<span class="kind">{t}</span>'
    gutter += "".join(f'<span class="flag flag-{f}">{f}</span>' for f in flags)
    gutter += TokenCount(tokens, estimated)
    placeholder = {"code": "code", "note": "a note (markdown)", "prompt": "ask the model (markdown)"}[t]
    # No toolbar here: static/app.js puts one shared toolbar in the selected cell (half of each cell's bytes).
    body = [f'<textarea class="cell-source{"-lazy" if lazy else ""}" name="source" data-lang="{lang}" rows="{src.count(chr(10)) + 1}" '
            f'aria-label="{t} source" placeholder="{placeholder}">\n{escape(src, quote=False)}</textarea>']  # the parser drops that one newline, not the source's own
    if t != "code":
        view = _md(src) if src.strip() else f'<p class="placeholder">Empty {t}: press Enter to write</p>'
        body.append(f'<div class="md-view md">{view}</div>')
    if t == "code":
        body.append(Outputs(m, running=ws.run_outputs(mid) is not None))
    elif t == "prompt":
        body.append(BudgetNote(mid, meter["prompts"].get(mid) if meter else None, meter, messages))
        body.append(Reply(m, streaming=reply_streaming))
    if t != "note":
        body.append(LoopView(ws, m, streaming=loop_streaming, trace=trace))
    cls = " ".join(["cell", f"cell-{t}", *flags])
    return Safe(f'<article class="{cls}" id="cell-{mid}" data-id="{mid}" data-type="{t}" tabindex="-1" '
                  f'aria-label="{t} cell"><div class="gutter">{gutter}</div><div class="cell-body">{"".join(body)}'
                  f'</div></article>')


EAGER_EDITORS = 40  # cells whose editor is made at page load; the rest wait until they near the screen


def Cells(ws: Workspace, dialog_id: int, messages: list[dict], meter: dict | None = None) -> Safe:
    # A CodeMirror editor costs the browser ~4 ms to make: 1,000 at load kept a long dialog blank for 4 s.
    traces = ws.latest_traces(dialog_id)
    if meter is None:
        meter = ws.meter.dialog(ws.store.get_dialog(dialog_id), messages)
    return Safe(f'<div id="cells" data-dialog="{dialog_id}">'
                + "".join(Cell(ws, m, trace=traces.get(m["id"]), lazy=n >= EAGER_EDITORS, meter=meter,
                               messages=messages)
                          for n, m in enumerate(messages)) + "</div>")




# -- the page around the cells --------------------------------------------------------------------

def AddBar(dialog_id: int):
    return Div(*[Button(f"+ {t.capitalize()}", type="button", data_act=f"add-{t}", cls=f"add-{t}", tabindex="-1")
                 for t in MESSAGE_TYPES], cls="add-bar")


def KeyHelp():
    """The keyboard overlay; static/app.js fills it from static/keys.js, where the keys are declared."""
    return Div(Div(Div(H2("Keyboard"), Button("Close", type="button", data_act="help", cls="close"), cls="help-head"),
                   cls="help-box"),
               id="keys-help", cls="overlay", hidden=True, role="dialog", aria_label="Keyboard shortcuts")


def ModelBadge(ws: Workspace):
    st = ws.models.status()
    text = {"ready": f"model: {st.get('model')}", "loading": f"model: loading {st.get('model') or ''}",
            "error": "model: not loaded", "idle": "model: not loaded"}[st["state"]]
    title = st.get("error") or " · ".join(x for x in (st.get("gpu"), st.get("note")) if x)
    extra = {} if st["state"] == "ready" else {"hx_get": "/model-badge", "hx_trigger": "load delay:2s",
                                                "hx_swap": "outerHTML"}
    return Span(text, id="model-state", cls=f"model-state model-{st['state']}", title=title, **extra)


def KernelBadge(ws: Workspace, dialog_id: int):
    state = ws.kernel_state(dialog_id)
    words = {"none": "not started"}.get(state, state)
    return Span(f"kernel: {words}", id="kernel-state", cls=f"kernel-state kernel-{state}", data_state=state,
                role="status", aria_live="polite")


def AutorunNote(ws: Workspace, d: dict, *, oob: bool = False):
    adapter = _text_or(d["settings"].get("adapter"))
    text = "Solve and Fix run model code in this kernel" + (f" · adapter {adapter}" if adapter else "") \
        + f" · cwd {ws.kernel_cwd or os.getcwd()}"
    return Span(text, id="autorun-note", cls="autorun-note" + (" has-adapter" if adapter else ""),
                title=f"{text}. Model code runs automatically only inside Solve and Fix; elsewhere it waits for Run.",
                **({"hx_swap_oob": "true"} if oob else {}))


def AdapterSelect(ws: Workspace, current: str | None):
    """Every registered adapter; those trained on another base than the loaded model are shown but disabled."""
    current = _text_or(current)
    options = [Option("none (base model)", value="", selected=not current)]
    choices = ws.adapter_choices()
    for a in choices:
        options.append(Option(f"{a['name']} · {a['base']}", value=a["name"], selected=a["name"] == current,
                              disabled=not a["fits"], title=a["why"]))
    if current and current not in {a["name"] for a in choices}:
        # Disabled, so the browser does not send it back: saving other fields leaves it as it is.
        options.append(Option(f"{current} (no longer registered)", value=current, selected=True, disabled=True,
                              title="Choose another adapter, or none."))
    return Select(*options, name="adapter", cls="settings-adapter", aria_label="Adapter")


def SettingField(ws: Workspace, key: str, value):
    """One field of the Settings panel, as the settings table has it; empty means the app default."""
    s, default = SETTINGS[key], ws.defaults.get(key)
    if key == "adapter":
        control = AdapterSelect(ws, value)
    elif s.choices:
        control = Select(Option(f"default ({default})", value=""),
                         *[Option(c, value=c, selected=c == value) for c in s.choices], name=key)
    elif key == "system_prompt":
        # The parser drops one newline after <textarea>; this one, so a prompt's own first newline stays.
        value = _text_or(value)
        control = Textarea("\n" + value if value else "", name=key, rows=5, placeholder=DEFAULT_SYSTEM_PROMPT)
    else:
        # A value the API stored beyond the range (an older Loopbook's) must still submit unchanged.
        high = max(s.high, value) if isinstance(value, int) and not isinstance(value, bool) else s.high
        control = Input(type="number", name=key, min=s.low, max=high, step=1 if s.kind is int else "any",
                        value="" if value is None else str(value), placeholder=f"default {default}")
    return Label(Span(s.label), control, cls="field wide" if key == "system_prompt" else "field")


def SettingsPanel(ws: Workspace, d: dict, *, open: bool = False, oob: bool = False):
    """The dialog's settings as a form, its fields those of the settings table that have a label."""
    s = d["settings"]
    # Compact, as the cells are: no whitespace text between the fields.
    return Safe(to_xml(Details(
        Summary("Settings"),
        Form(*[SettingField(ws, key, s.get(key)) for key in FORM_KEYS],
             Div(Span("Empty fields use the app default.", cls="hint"), Button("Save settings", type="submit"),
                 cls="settings-foot"),
             hx_post=f"/d/{d['id']}/settings", hx_target="#toast", hx_swap="beforeend", cls="menu settings-form"),
        id="settings", cls="settings", open=open, **({"hx_swap_oob": "true"} if oob else {})), indent=False))


def DialogHeader(ws: Workspace, d: dict, meter: dict | None = None):
    did = d["id"]
    return Header(
        A("Loopbook", href="/", cls="brand"),
        Form(Input(name="title", value=d["title"], cls="dialog-title", aria_label="Dialog title"),
             hx_post=f"/d/{did}/rename", hx_trigger="change, submit", hx_swap="none", cls="rename"),
        KernelBadge(ws, did),
        ModelBadge(ws),
        Safe(ContextMeter(meter or ws.tokens(did))),
        AutorunNote(ws, d),
        Div(Button("Run all", type="button", data_act="run-all", cls="run-all", title="Run every code cell in order"),
            Button("Interrupt", type="button", data_act="interrupt", cls="interrupt", title="Interrupt (i i)"),
            Button("Restart", type="button", data_act="restart", cls="restart", title="Restart the kernel (0 0)"),
            Button("Duplicate", hx_post=f"/d/{did}/duplicate", cls="duplicate", title="Branch this dialog"),
            Details(Summary("Export"),
                    Div(A(".ipynb", href=f"/d/{did}/export.ipynb", cls="export-ipynb"),
                        A(".py", href=f"/d/{did}/export.py", cls="export-py"),
                        A(".md", href=f"/d/{did}/export.md", cls="export-md"), cls="menu"), cls="export"),
            SettingsPanel(ws, d),
            Button("?", type="button", data_act="help", cls="help", title="Keyboard shortcuts (?)"),
            LogoutButton(),
            cls="actions"),
        cls="topbar")


# -- pages and page fragments ----------------------------------------------------------------------

def page(handler):
    """Like `api`, but errors become a message in the page's toast area for the page's own requests (they say
    HX-Request, and htmx swaps only a 2xx answer), and a plain message with the error's status for others."""
    sig = inspect.signature(handler, eval_str=True)
    named = next((n for n, p in sig.parameters.items() if p.annotation is Request), None)

    @functools.wraps(handler)
    async def wrapper(*args, **kwargs):
        req = kwargs.get(named) if named else kwargs.pop("_page_request", None)
        try:
            result = handler(*args, **kwargs)
            return await result if asyncio.iscoroutine(result) else result
        except StoreError as e:
            if req is not None and "hx-request" not in req.headers:
                return PlainTextResponse(str(e), status_code=e.status)
            return Response(f'<div class="toast-msg">{escape(str(e))}</div>', status_code=200,
                            headers={"HX-Retarget": "#toast", "HX-Reswap": "innerHTML"}, media_type="text/html")
    # FastHTML passes what the signature asks for: ask for the request too when the handler does not.
    extra = [] if named else [inspect.Parameter("_page_request", inspect.Parameter.KEYWORD_ONLY, annotation=Request)]
    wrapper.__signature__ = sig.replace(parameters=[*sig.parameters.values(), *extra])
    return wrapper


# The security headers say Referrer-Policy: no-referrer, under which the browser sends `Origin: null` with
# same-origin POSTs (forms, fetch, htmx), and the access check refuses those as cross-site. Same-origin
# still sends nothing to other sites, and lets our own requests say where they come from.
REFERRER = Meta(name="referrer", content="same-origin")
ICON_SVG = ('<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 32 32"><rect width="32" height="32" rx="7" '
            'fill="#2f6fdf"/><path d="M9 8v16h14" stroke="#fff" stroke-width="4" fill="none"/></svg>')
TAB_HEADER = "x-loopbook-tab"  # which tab of the page saves (static/app.js names itself)


@route("GET", "/favicon.ico")
def favicon():
    return Response(ICON_SVG, media_type="image/svg+xml", headers={"Cache-Control": "max-age=86400"})


def LogoutButton():
    return Form(Button("Log out", type="submit", title="End this browser's login (the start-up URL logs in again)"),
                action="/logout", method="post", cls="logout")


@route("POST", "/logout")
def log_out(state, req: Request):
    """End this browser's login: its session is dropped here and its cookie cleared. (A POST, and from this
    origin only, like every write: another site cannot log you out.)"""
    sid = req.scope.get("loopbook.session")
    if sid:
        state.sessions.drop(sid)
    # A bare page, like the log-in one: a logged-out browser may load none of the app's own files.
    resp = HTMLResponse("<!doctype html><html lang=en><title>Loopbook: logged out</title><h1>Logged out</h1><p>This "
                        "browser's login has ended. To log in again, open the URL Loopbook printed at start-up (it "
                        "ends in ?token=...).</p></html>")
    resp.delete_cookie(session_cookie(state.cfg), path="/", httponly=True, samesite="strict")
    return resp


def Home(ws: Workspace, q: str = "", error: str | None = None):
    dialogs = ws.store.list_dialogs(search=q or None)
    return (Title("Loopbook"), REFERRER,
            Main(Div(H1("Loopbook"), LogoutButton(), cls="home-head"),
                 Div(error, cls="import-error", role="alert") if error else None,
                 Form(Input(name="title", placeholder="New dialog title", required=True, autofocus=not q and not error,
                            aria_label="New dialog title"),
                      Button("New dialog", type="submit"), action="/dialogs", method="post", cls="new-dialog"),
                 Form(Input(name="q", value=q, placeholder="Search titles", type="search", aria_label="Search titles",
                            autofocus=bool(q)),
                      action="/", method="get", cls="search"),
                 Form(Input(type="file", name="file", accept=".ipynb,application/json", required=True,
                            aria_label="Notebook file"),
                      Button("Import .ipynb", type="submit"), action="/dialogs/import", method="post",
                      enctype="multipart/form-data", cls="import"),
                 Form(Select(Option("all formats", value="all"), Option("SFT", value="sft"),
                             Option("SFT, final turn", value="sft_final"), Option("preference", value="preference"),
                             Option("KTO", value="kto"), Option("trajectories", value="trajectory"),
                             name="format", aria_label="Dataset format"),
                      Select(Option("all outcomes", value="all"), Option("solved", value="solved"),
                             Option("unsolved", value="unsolved"), name="outcome", aria_label="Outcome"),
                      Button("Export dataset (.zip)", type="submit"), action="/api/export", method="post",
                      cls="export-dataset", title="Every trace in this store as training data, with a dataset card"),
                 Ul(*[Li(A(d["title"], href=f"/d/{d['id']}"),
                         Span(f"{d['n_messages']} cells · {d['updated_at'][:16].replace('T', ' ')}", cls="meta"),
                         Button("Delete", hx_delete=f"/d/{d['id']}", hx_target="closest li", hx_swap="outerHTML",
                                hx_confirm=f"Delete the dialog {d['title']!r} and its cells? This cannot be undone.",
                                cls="delete")) for d in dialogs],
                    cls="dialog-list") if dialogs else P("No dialogs match." if q else "No dialogs yet.", cls="empty"),
                 cls="home"))


@route("GET", "/")
def home(state, q: str = ""):
    return Home(state.ws, q)


def full_page(parts: tuple, status_code: int = 200) -> HTMLResponse:
    """A whole page with a status other than 200 (FastHTML's own wrapping always answers 200)."""
    head = [p for p in parts if getattr(p, "tag", "") in ("title", "meta")]
    body = [p for p in parts if p is not None and getattr(p, "tag", "") not in ("title", "meta")]
    return HTMLResponse("<!doctype html>\n" + to_xml(Html(Head(Meta(charset="utf-8"), *head, *HDRS), Body(*body),
                                                         lang="en")), status_code=status_code)


def error_page(e: StoreError, back: str = "") -> HTMLResponse:
    return HTMLResponse(f"<!doctype html><title>Loopbook</title><p>{escape(str(e))}</p>{back}", status_code=e.status)


@route("POST", "/dialogs")
def create_dialog(state, title: str = "Untitled"):
    try:
        d = state.ws.new_dialog(title, empty_cell=True)
    except StoreError as e:
        return PlainTextResponse(str(e), status_code=e.status)
    return RedirectResponse(f"/d/{d['id']}", status_code=303)


@route("GET", "/d/{id}")
def dialog_page(state, id: str):
    ws = state.ws
    try:
        d = ws.store.get_dialog(id)
    except StoreError as e:
        return error_page(e, "<p><a href='/'>All dialogs</a></p>")
    notices = state.flash.pop(d["id"], [])
    messages = ws.store.messages(d["id"])
    meter = ws.meter.dialog(d, messages)
    return (Title(f"{d['title']} · Loopbook"), REFERRER,
            DialogHeader(ws, d, meter),
            Main(Cells(ws, d["id"], messages, meter), AddBar(d["id"]), cls="dialog", data_dialog=str(d["id"]),
                 data_ghost_delay=str(max(state.cfg.ghost_delay, 0))),
            KeyHelp(),
            Div(*[Div(n, cls="toast-msg") for n in notices], id="toast", cls="toast", role="status", aria_live="polite"))


@route("POST", "/dialogs/import")
async def import_notebook(state, req: Request):
    form = await req.form()
    upload = form.get("file")
    if upload is None or not hasattr(upload, "read"):
        return full_page(Home(state.ws, error="Choose a .ipynb file to import."), status_code=400)
    try:
        d = state.ws.import_notebook(await upload.read(), upload.filename or None)
    except StoreError as e:
        return full_page(Home(state.ws, error=f"Nothing was imported. {e}"), status_code=e.status)
    if d.get("notices"):
        state.flash[d["id"]] = d["notices"]
    return RedirectResponse(f"/d/{d['id']}", status_code=303)


@route("DELETE", "/d/{id}")
@page
async def delete_dialog(state, id: str):
    await state.ws.delete_dialog(id)
    return ""


@route("POST", "/d/{id}/duplicate")
@page
def duplicate_dialog(state, id: str):
    d = state.ws.store.duplicate_dialog(id)
    return Response("", headers={"HX-Redirect": f"/d/{d['id']}"})


@route("GET", "/d/{id}/export.{fmt}")
def export_dialog_file(state, id: str, fmt: str):
    try:
        return dialog_file(state.ws, id, fmt)
    except StoreError as e:
        return PlainTextResponse(str(e), status_code=e.status)


@route("POST", "/d/{id}/rename")
@page
def rename_dialog(state, id: str, title: str = ""):
    state.ws.change_dialog(id, title=title)
    return ""


@route("POST", "/d/{id}/settings")
@page
async def save_settings(state, id: str, req: Request):
    """Save the Settings panel: the same check as the API, then a toast, the panel and the header note."""
    ws = state.ws
    patch = from_form(await req.form())
    check_unicode(patch)
    d = ws.change_dialog(id, settings=patch)
    return Div("Settings saved", cls="toast-msg"), SettingsPanel(ws, d, open=True, oob=True), AutorunNote(ws, d, oob=True)


@route("POST", "/d/{id}/cells")
@page
def add_cell(state, id: str, type: str = "code", after: str = "", before: str = ""):
    return Cell(state.ws, state.ws.store.add_message(id, type, "", after=after or None, before=before or None))


@route("PUT", "/cells/{id}")
@page
def save_cell(state, id: str, req: Request, source: str | None = None, base: str | None = None):
    state.ws.cells.save(id, source, base, req.headers.get(TAB_HEADER))
    return ""


@route("POST", "/cells/{id}/save")
@page
def save_and_render_cell(state, id: str, req: Request, source: str | None = None, base: str | None = None):
    """Save and re-render: a note or prompt leaving edit mode shows its markdown rendered."""
    return Cell(state.ws, state.ws.cells.save(id, source, base, req.headers.get(TAB_HEADER)))


@route("DELETE", "/cells/{id}")
@page
def delete_cell(state, id: str):
    state.ws.cells.delete(id)
    return ""


@route("POST", "/cells/{id}/restore")
@page
def restore_cell(state, id: str, after: str = "", before: str = ""):
    """Undo a delete: the cell comes back where it was (after `after` or before `before`), outputs included."""
    return Cell(state.ws, state.ws.cells.restore(id, after, before))


@route("POST", "/cells/{id}/paste")
@page
def paste_cell(state, id: str, dialog: str = "", after: str = "", before: str = ""):
    """A copy of cell `id` (still there, or cut) in `dialog`, after or before a cell; outputs included."""
    return Cell(state.ws, state.ws.cells.paste(id, dialog, after, before))


@route("POST", "/cells/{id}/type")
@page
def set_cell_type(state, id: str, type: str):
    return Cell(state.ws, state.ws.cells.edit(id, {"type": type}))


@route("POST", "/cells/{id}/toggle")
@page
def toggle_cell_flag(state, id: str, field: str):
    return Cell(state.ws, state.ws.cells.toggle(id, field))


def whole_number(name: str, text: str) -> int:
    """A query or form value that must be a whole number (taken as text: FastHTML's own conversion answers
    404 with Python's "invalid literal for int()")."""
    if not re.fullmatch(r"[+-]?[0-9]{1,18}", text.strip()):
        raise InvalidInput(f"'{name}' must be a whole number; got {text[:40]!r}.")
    return int(text)


@route("POST", "/cells/{id}/move")
@page
def move_cell(state, id: str, offset: str = "0"):
    """Move by `offset` places; the page moves the element itself, so nothing is re-rendered."""
    m = state.ws.store.move_message(id, offset=whole_number("offset", offset))
    return Response("", headers={"X-Position": str(m["position"])})


@route("POST", "/cells/{id}/run")
@page
async def run_cell(state, id: str, req: Request, source: str | None = None, base: str | None = None):
    if source is not None:
        state.ws.cells.save(id, source, base, req.headers.get(TAB_HEADER), then="run")
    await state.ws.run(id)
    return Cell(state.ws, state.ws.store.get_message(id))


@route("GET", "/cells/{id}/output/{n}")
@page
def full_output(state, id: str, n: str):
    """One output in full: what "show all" fetches for a collapsed output."""
    n = whole_number("n", n)
    m = state.ws.store.get_message(id)
    outputs = m.get("outputs") or []
    if not 0 <= n < len(outputs):
        raise InvalidInput(f"Cell {m['id']} has no output {n}; run it again.")
    return OutputView(outputs[n], m["id"], n, full=True)


@route("GET", "/cells/{id}/run-stream")
async def run_stream(state, id: str, req: Request, wait: str = ""):
    """A code cell's outputs as its run makes them ("outputs" events, see live_outputs), then "done" with the
    finished cell. The page opens it as it sends Run (`wait=1`: the stream may arrive first, so it waits up to 5 s
    for the run to start); a page loaded mid-run gets the whole view first."""
    ws = state.ws

    async def events():
        n = 0
        try:
            view = await ws.follow_run(id, 5.0 if wait else 0.0)
            mid = ws.store.get_message(id)["id"]
        except StoreError as e:
            yield "done", to_xml(Div(str(e), id=f"cell-{id}")), 1
            return
        if view is not None:
            n += 1
            yield "outputs", json.dumps({"clear": True, "n": 0, "set": []}), n
            async for cleared, changed, outputs in view.follow():
                n += 1
                yield "outputs", live_outputs(mid, cleared, changed, outputs), n
        try:
            final = Cell(ws, ws.store.get_message(mid))
        except StoreError as e:
            final = to_xml(Div(str(e), id=f"cell-{id}"))
        yield "done", final, n + 1

    return event_stream(events())


@route("POST", "/d/{id}/interrupt")
@page
async def interrupt_dialog(state, id: str):
    """Stop the model wherever it works in this dialog and interrupt the kernel (the header's Interrupt, i i)."""
    return KernelBadge(state.ws, await state.ws.interrupt(id))


@route("POST", "/d/{id}/restart")
@page
async def restart_kernel(state, id: str):
    return KernelBadge(state.ws, await state.ws.restart(id))


@route("GET", "/d/{id}/meter")
@page
def token_meter(state, id: str):
    """The header's token meter and every prompt's budget note (out of band), fresh after a change."""
    ws = state.ws
    d = ws.store.get_dialog(id)
    messages = ws.store.messages(d["id"])
    meter = ws.meter.dialog(d, messages)
    return Safe(ContextMeter(meter, oob=True) + "".join(
        BudgetNote(m["id"], meter["prompts"].get(m["id"]), meter, messages, oob=True)
        for m in messages if m["type"] == "prompt"))


@route("GET", "/d/{id}/kernel")
@page
def kernel_badge(state, id: str):
    return KernelBadge(state.ws, state.ws.store.get_dialog(id)["id"])


@route("POST", "/cells/{id}/ask")
@page
async def ask_prompt(state, id: str, req: Request, source: str | None = None, base: str | None = None):
    if source is not None:
        state.ws.cells.save(id, source, base, req.headers.get(TAB_HEADER), then="asked")
    try:
        m, _, _ = await state.ws.ask(id, {})
    except ModelError as e:
        raise InvalidInput(f"No model to answer with: {e}") from None
    return Cell(state.ws, m, reply_streaming=True)


@route("POST", "/cells/{id}/stop")
@page
async def stop_cell(state, id: str):
    await state.ws.stop(id)
    return ""


@route("GET", "/cells/{id}/stream")
async def reply_stream(state, id: str, req: Request):
    """A reply as it is written: tokens, then the finished reply to swap in."""
    ws, start = state.ws, last_event_id(req)
    live = ws.reply_live(id)

    async def events():
        n = start
        if live is not None:
            async for batch in live.follow(start):
                text = "".join(ev["text"] if ev["type"] == "token" else tool_event_text(ev) for ev in batch
                               if ev["type"] in ("token", "tool", "note"))
                n += len(batch)
                if text:
                    yield "token", escape(text), n
        try:
            final = Reply(ws.store.get_message(id))
        except StoreError as e:
            final = to_xml(Div(str(e), id=f"reply-{id}", cls="reply"))
        yield "done", final, n + 1

    return event_stream(events())


@route("GET", "/cells/{id}/reply")
@page
def show_reply(state, id: str, edit: str = ""):
    m = state.ws.store.get_message(id)
    return ReplyEditor(m) if edit else Reply(m)


@route("POST", "/cells/{id}/reply")
@page
def save_reply(state, id: str, reply: str | None = None, base: str | None = None):
    """A reply edited by hand. `base`: the reply as the editor opened with it, as with a cell's `base`."""
    return Reply(state.ws.cells.edit_reply(id, reply, base))


@route("POST", "/cells/{id}/extract")
@page
def extract_code(state, id: str):
    """The reply's code blocks as new code cells under the prompt."""
    return Safe("".join(Cell(state.ws, c) for c in state.ws.cells.extract(id)))


@route("POST", "/cells/{id}/solve")
@page
async def solve_prompt(state, id: str, req: Request, source: str | None = None, base: str | None = None):
    if source is not None:
        state.ws.cells.save(id, source, base, req.headers.get(TAB_HEADER), then="solved")
    try:
        m, _, _ = await state.ws.solve(id, {}, "solve")
    except ModelError as e:
        raise InvalidInput(f"No model to solve with: {e}") from None
    return Cell(state.ws, state.ws.store.get_message(m["id"]), loop_streaming=True)


@route("POST", "/cells/{id}/fix")
@page
async def fix_cell(state, id: str):
    try:
        m, _, _ = await state.ws.solve(id, {}, "fix")
    except ModelError as e:
        raise InvalidInput(f"No model to fix with: {e}") from None
    return Cell(state.ws, state.ws.store.get_message(m["id"]), loop_streaming=True)


@route("GET", "/cells/{id}/loop-stream")
async def loop_stream(state, id: str, req: Request):
    """A Solve or Fix as it runs: tokens, attempts, then the finished cell (and the code cell it landed)."""
    ws, start = state.ws, last_event_id(req)
    live = ws.loop_live(id)

    async def events():
        n = start
        if live is not None:
            outputs: list[dict] = []  # the running candidate's, live (kernels.apply_events)
            async for batch in live.follow(start):
                text, lines, changed = [], [], False
                for ev in batch:
                    if ev["type"] == "token":
                        text.append(ev["text"])
                    elif ev["type"] == "attempt_start":
                        outputs, changed = [], True
                        if ev["round"] + ev["candidate"] > 0:
                            text.append(f"\n--- round {ev['round']}, candidate {ev['candidate']} ---\n")
                    elif ev["type"] == "outputs":
                        apply_events(outputs, ev["events"])
                        changed = True
                    elif ev["type"] == "attempt":
                        lines.append(AttemptLine(ev["attempt"]))
                    elif ev["type"] == "selected":
                        lines.append(SelectionLine(ev["round"], ev["selection"]))
                    elif ev["type"] == "note":
                        lines.append(NoteLine(ev["text"]))
                n += len(batch)
                if text:
                    yield "token", escape("".join(text)), n
                if changed:
                    yield "outputs", "".join(_output(o, int(id), i, False) for i, o in enumerate(outputs)), n
                if lines:
                    yield "attempt", "".join(lines), n
        try:
            m = ws.store.get_message(id)
            final = Cell(ws, m)
            code_id = (m.get("reply_meta") or {}).get("code_message_id") if m["type"] == "prompt" else None
            if code_id and ws.loop_live(id) is live:
                try:
                    final += Cell(ws, ws.store.get_message(code_id))
                except StoreError:
                    pass
        except StoreError as e:
            final = to_xml(Div(str(e), id=f"cell-{id}"))
        yield "done", final, n + 1

    return event_stream(events())


def SelectionDetail(sel: dict):
    """One candidate's part in its round's selection, on the trace page."""
    place = (f"group {sel['group'] + 1} of {len(sel.get('groups') or [])}" if isinstance(sel.get("group"), int)
             else f"dropped out{': ' + sel['why'] if sel.get('why') else ''}")
    winner = sel.get("winner")
    verdict = "chosen" if sel.get("chosen") else (f"candidate {winner} chosen" if winner is not None else "no winner")
    fresh = " · a fresh sample of the task, the failure unseen" if sel.get("fresh") else ""
    return Div(f"Selection: {place} · {verdict} · {sel.get('reason') or ''}{fresh}", cls="selection-detail")


@route("GET", "/traces/{id}")
def trace_page(state, id: str):
    try:
        t = state.ws.traces.get_trace(id)
    except StoreError as e:
        return error_page(e)
    back = f"/d/{t['dialog_id']}" if t.get("dialog_id") else "/"

    def Round(a: dict):
        inputs = a.get("input_messages") or []
        checks = a.get("checks") or {}
        return Article(
            H2(f"Round {a['round']}" + (f", candidate {a['candidate']}" if a.get("candidate") else "")
               + f" · {STATUS_WORDS.get(a['exec_status'], a['exec_status'])}" + (" · human" if a["author"] == "human" else "")),
            Details(Summary(f"What the model saw ({len(inputs)} messages)"),
                    *[Div(Div(msg["role"], cls="role"), Pre(msg["content"] if isinstance(msg["content"], str)
                                                            else json.dumps(msg["content"])[:5000]), cls="msg")
                      for msg in inputs]),
            Details(Summary("What it wrote"), Pre(a.get("completion") or ""), open=True),
            Details(Summary("What ran"), Pre(a.get("code") or "(no code)")),
            Details(Summary("What came back"),
                    Pre(NotStr(ansi_html("\n".join(a.get("traceback") or []))) if a.get("traceback") else "no error"),
                    Pre(a.get("stdout") or "", cls="out-stream") if a.get("stdout") else None,
                    Pre(json.dumps(checks, indent=1)) if checks else None, open=not a.get("passed")),
            Details(Summary("Feedback sent back"), Pre(a["feedback"]), open=True) if a.get("feedback") else None,
            SelectionDetail(a.get("selection")) if isinstance(a.get("selection"), dict) else None,
            Div(" · ".join(x for x in (f"TTFT {a['ttft_s']:.2f} s" if a.get("ttft_s") is not None else "",
                                       f"{a['tokens_per_s']:.1f} tok/s" if a.get("tokens_per_s") else "",
                                       f"ran {a['exec_s']:.3f} s" if a.get("exec_s") else "") if x), cls="figures"),
            cls="round")

    return (Title(f"Trace {t['id']} · Loopbook"),
            Main(A("← back", href=back), H1(f"Trace {t['id']}: {t['kind']} {t['status']} ({t.get('stop_reason') or ''})"),
                 P(f"{t.get('model')} via {t.get('backend')} · {t['n_attempts']} attempts · started {t['created_at']}"),
                 NotStr(CostLine(state.ws.traces.spent(t["attempts"]))),
                 *[Round(a) for a in t["attempts"]], cls="trace-page"))


@route("GET", "/model-badge")
def model_badge(state):
    return ModelBadge(state.ws)


@route("GET", "/ansi.css")
def ansi_stylesheet():
    return Response(ansi_css(), media_type="text/css")


# -- entry point -------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> None:
    import uvicorn

    cfg = parse_config(argv)
    if not (math.isfinite(cfg.session_hours) and 0 < cfg.session_hours <= 24 * 3660):
        sys.exit(f"--session-hours must be more than 0 and at most ten years; got {cfg.session_hours}.")
    data_dir = default_data_dir(cfg.data_dir)
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # the store holds all your work: yours alone
    if cfg.host not in ("127.0.0.1", "localhost", "::1"):
        # Anyone who reaches this address can run code as you: demand a token chosen on purpose.
        if not cfg.token:
            sys.exit(f"Refusing to bind {cfg.host} without an explicit token: pass --token or set LOOPBOOK_TOKEN "
                     "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`).")
        if len(cfg.token) < 16:
            sys.exit(f"Refusing to bind {cfg.host} with a token of {len(cfg.token)} characters: use at least 16.")
    cfg.token = resolve_token(cfg, data_dir)
    shown = "[::1]" if cfg.host == "::1" else cfg.host
    print(f"Loopbook: data in {data_dir}", flush=True)
    print(f"Loopbook is running at http://{shown}:{cfg.port}/?token={cfg.token}", flush=True)
    uvicorn.run(create_app(cfg), host=cfg.host, port=cfg.port, log_level="warning", timeout_graceful_shutdown=5)


if __name__ == "__main__":
    main()
