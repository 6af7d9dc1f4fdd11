"""Loopbook: the web app. Routes, page components and the JSON API; the work happens in the packages."""

from __future__ import annotations

import argparse
import asyncio
import base64
import functools
import re
from html import escape
import hashlib
import hmac
import inspect
import json
import logging
import math
import os
import secrets
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit

from fasthtml.common import (A, Article, Body, Button, Details, Div, FastHTML, Form, H1, H2, Head, Header, Html, Input,
                             Label, Li, Link, Main, Meta, NotStr, Option, P, Pre, Safe, Script, Select, Span, Summary, Textarea, Title, Ul, to_xml)
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import (HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response,
                                 StreamingResponse)
from starlette.staticfiles import StaticFiles

from dialog import MESSAGE_TYPES, Conflict, InvalidInput, Store, StoreError, default_data_dir, lone_surrogate
from dialog.context import DEFAULT_SYSTEM_PROMPT
from dialog.notebook import export_dialog, import_ipynb
from dialog.render import IMAGE_MIMES, ansi_css, ansi_html, markdown_html, text_of
from execfeedback.adapters.registry import get as get_adapter, list_adapters, resolve_adapter
from execfeedback.export.exporter import ExportError, options_from_mapping, stream_export_zip
from execfeedback.workspace.ask import ask, sampling_from
from execfeedback.workspace.live import LiveHub
from execfeedback.workspace.solve import (RETRY_MODES, Loop, LoopConfig, TraceStore, dialog_key, fix_task, land,
                                          loop_config, note_edit, solve_task, summary)
from kernels import KernelInitError, KernelPool, KernelStartError
from kernels.helper_setup import dialog_of_kernel_token, kernel_env, kernel_init_code
from local_model import ModelError
from local_model.loader import BACKENDS
from local_model.registry import ALIASES, MODELS, canonical_name
from local_model.registry import resolve as resolve_model
from local_model.resident import Resident

ROOT = Path(__file__).resolve().parent


# -- configuration: every knob is a flag and an environment variable ---------------------------

@dataclass
class Knob:
    flag: str
    env: str
    default: object
    help: str
    type: type = str


def size_bytes(text: str) -> int:
    """'4G', '512M', '800k' or a plain number of bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*", str(text), re.I)
    if not m:
        raise ValueError(f"{text!r} is not a size; write it like 4G, 512M or 1073741824")
    return int(float(m.group(1)) * 1024 ** " kmgt".index(m.group(2).lower() or " "))


KNOBS = [
    Knob("--host", "LOOPBOOK_HOST", "127.0.0.1", "address to bind; anything but loopback needs a token"),
    Knob("--port", "LOOPBOOK_PORT", 5001, "port to listen on", int),
    Knob("--data-dir", "LOOPBOOK_DATA_DIR", None, "where the store, models and token live (default ~/.loopbook)"),
    Knob("--token", "LOOPBOOK_TOKEN", None, "access token (default: a random one kept in DATA_DIR/token)"),
    Knob("--model", "LOOPBOOK_MODEL", "default", "model: a short name (see `python -m local_model list`) or a GGUF path"),
    Knob("--backend", "LOOPBOOK_BACKEND", None, "llama (in process), anthropic, or openai (any OpenAI-compatible server)"),
    Knob("--base-url", "LOOPBOOK_BASE_URL", None, "base URL of an OpenAI-compatible server (or an Anthropic proxy)"),
    Knob("--n-ctx", "LOOPBOOK_N_CTX", 8192, "context window in tokens for in-process models", int),
    Knob("--n-gpu-layers", "LOOPBOOK_N_GPU_LAYERS", None, "layers to offload to the GPU (default: all that fit)", int),
    Knob("--max-tokens", "LOOPBOOK_MAX_TOKENS", 1024, "longest reply in tokens", int),
    Knob("--temperature", "LOOPBOOK_TEMPERATURE", 0.0, "sampling temperature for replies", float),
    Knob("--rounds", "LOOPBOOK_ROUNDS", 3, "feedback rounds after the first attempt in Solve and Fix", int),
    Knob("--candidates", "LOOPBOOK_CANDIDATES", 1, "code samples per round; the first that passes the checks wins", int),
    Knob("--repeat-resamples", "LOOPBOOK_REPEAT_RESAMPLES", 2,
         "when a feedback round returns code already tried, sample again warmer, up to N times", int),
    Knob("--exec-timeout", "LOOPBOOK_EXEC_TIMEOUT", 120.0, "seconds a cell may run before it is interrupted (0: no limit)", float),
    Knob("--output-cap", "LOOPBOOK_OUTPUT_CAP", 200_000, "characters of output kept per cell (head and tail)", int),
    Knob("--kernel-cwd", "LOOPBOOK_KERNEL_CWD", None, "working directory of the kernels (default: where you start)"),
    Knob("--cull-idle", "LOOPBOOK_CULL_IDLE", 0.0, "shut kernels idle this many seconds (0: never)", float),
    Knob("--allow-host", "LOOPBOOK_ALLOW_HOSTS", "", "extra Host header values to accept, comma separated"),
    Knob("--max-body", "LOOPBOOK_MAX_BODY", 64 * 1024 * 1024, "largest request body in bytes", int),
    Knob("--session-hours", "LOOPBOOK_SESSION_HOURS", 168.0,
         "hours a browser login lasts; then open the start-up URL again", float),
    Knob("--kernel-memory", "LOOPBOOK_KERNEL_MEMORY", 0, "address-space limit per kernel, e.g. 4G or 512M (0: none)",
         size_bytes),
]


@dataclass
class Config:
    host: str = "127.0.0.1"
    port: int = 5001
    data_dir: str | None = None
    token: str | None = None
    model: str = "default"
    backend: str | None = None
    base_url: str | None = None
    n_ctx: int = 8192
    n_gpu_layers: int | None = None
    max_tokens: int = 1024
    temperature: float = 0.0
    rounds: int = 3
    candidates: int = 1
    repeat_resamples: int = 2
    exec_timeout: float = 120.0
    output_cap: int = 200_000
    kernel_cwd: str | None = None
    cull_idle: float = 0.0
    allow_host: str = ""
    max_body: int = 64 * 1024 * 1024
    kernel_memory: int = 0
    session_hours: float = 168.0
    extra: dict = field(default_factory=dict)


def parse_config(argv: list[str] | None = None) -> Config:
    parser = argparse.ArgumentParser(description="Loopbook: a notebook for dialogue engineering.")
    for k in KNOBS:
        env = os.environ.get(k.env)
        default = k.type(env) if env not in (None, "") else k.default
        parser.add_argument(k.flag, type=k.type, default=default, help=f"{k.help} [{k.env}]")
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


class State:
    cfg: Config = Config()
    store: Store
    pool: KernelPool
    models: Resident
    hub: LiveHub
    traces: TraceStore
    loops: dict
    background: set = set()
    token: str = ""
    sessions: "Sessions"


S = State()


# -- access: token auth, host allow-list, same-origin writes, security headers ------------------

LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}
SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}
# A Host header as RFC 9110 has it: a name, an IPv4 address or a bracketed IPv6 one, then perhaps a port.
# Anything else ("localhost:5099.evil.com", "evil.com@localhost", "localhost:evil") names no host of ours.
HOST_HEADER = re.compile(r"(?:\[(?P<ip6>[0-9a-fA-F:.]+)\]|(?P<name>[A-Za-z0-9._-]+))(?::[0-9]{1,5})?")
# HTML outputs are srcdoc frames (about:srcdoc, never fetched), which inherit this policy: scripts and
# inline styles inside them do not run, whatever the notebook says. Nothing else is framed.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "frame-src about:; connect-src 'self'; object-src 'none'; base-uri 'none'; "
       "form-action 'self'; frame-ancestors 'none'")
SECURITY_HEADERS = [(b"content-security-policy", CSP.encode()), (b"x-content-type-options", b"nosniff"),
                    (b"referrer-policy", b"no-referrer"), (b"x-frame-options", b"DENY"),
                    (b"cross-origin-opener-policy", b"same-origin"), (b"cross-origin-resource-policy", b"same-origin")]


def too_large() -> str:
    return (f"The request body is over {S.cfg.max_body:,} bytes; send less, or start Loopbook with a larger "
            "--max-body.")


def session_cookie() -> str:
    # Browsers keep cookies per host, not per port: the port in the name keeps two Loopbooks on one machine
    # from overwriting each other's login (it does not hide the cookie from other ports; SECURITY.md says so).
    return f"loopbook_session_{S.cfg.port}"


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


def session_seconds() -> int:
    return max(1, int(S.cfg.session_hours * 3600))


log = logging.getLogger("loopbook")


def dialog_born(dialog_id: int) -> str | None:
    """When a dialog was made (its kernel token is bound to it), or None when there is no such dialog."""
    try:
        return S.store.get_dialog(dialog_id)["created_at"]
    except StoreError:
        return None


class AccessMiddleware:
    """Plain ASGI, so static files, SSE and the API pass the same gate as the pages."""

    def __init__(self, app):
        self.app = app

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
                    + SECURITY_HEADERS
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
        token = req.query_params.get("token")
        if token is not None and req.method == "GET":
            if not hmac.compare_digest(token.encode(), S.token.encode()):
                return self.deny(req, "That token is not valid.")
            query = urlencode([(k, v) for k, v in parse_qsl(scope.get("query_string", b"").decode("latin-1"))
                               if k != "token"])
            # One leading slash: "//evil.example/?token=..." must not become an off-site redirect.
            resp = RedirectResponse("/" + scope["path"].lstrip("/") + (f"?{query}" if query else ""), status_code=303)
            old = req.cookies.get(session_cookie())
            if old:
                S.sessions.drop(old)  # logging in again replaces this browser's login
            resp.set_cookie(session_cookie(), S.sessions.new(S.token, session_seconds()), max_age=session_seconds(),
                            httponly=True, samesite="strict", path="/")
            return resp
        if not self.authorised(req):
            return self.deny(req, "Log in with the URL Loopbook printed at start-up (it ends in ?token=...), "
                                  "or send 'Authorization: token ...'.")
        # No cookie goes further. FastHTML fills a handler's parameters from cookies before form fields, and
        # any page on this host may set cookies here (they ignore ports): a cookie named "source" would have
        # replaced the text a Run sends. The login is all the app needs, and it is checked above.
        scope["loopbook.session"] = req.cookies.get(session_cookie())
        scope["headers"] = [(k, v) for k, v in scope["headers"] if k.lower() != b"cookie"]
        return None

    @staticmethod
    def limited(receive):
        """Count body bytes as they arrive: a chunked body has no Content-Length to refuse up front."""
        seen = 0

        async def receive_limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > S.cfg.max_body:
                    raise HTTPException(413, too_large())
            return message
        return receive_limited

    @staticmethod
    def allowed_hosts() -> set[str]:
        allowed = LOOPBACK_HOSTS | {h.strip().strip("[]").lower() for h in S.cfg.allow_host.split(",") if h.strip()}
        if S.cfg.host not in ("0.0.0.0", "::"):
            allowed.add(S.cfg.host.strip("[]").lower())
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
            if length and length.isascii() and length.isdigit() and int(length) > S.cfg.max_body:
                return JSONResponse({"error": too_large()}, status_code=413)
        return None

    def authorised(self, req: Request) -> bool:
        auth = req.headers.get("authorization", "")
        scheme, _, value = auth.partition(" ")
        value = value.strip()
        if scheme.lower() in ("token", "bearer"):
            if hmac.compare_digest(value.encode(), S.token.encode()):
                return True
            dialog_id = dialog_of_kernel_token(S.token, value, dialog_born)
            if dialog_id is not None:
                req.scope["loopbook.kernel_dialog"] = dialog_id
                return self.kernel_may(req, dialog_id)
        sid = req.cookies.get(session_cookie())
        return bool(sid) and S.sessions.valid(S.token, sid)

    @staticmethod
    def kernel_may(req: Request, dialog_id: int) -> bool:
        """A kernel's token reaches its own dialog's API: its messages and cells, nothing else."""
        path = req.url.path
        # ASCII digits, and few: \d takes other scripts' digits, and int() refuses more than 4,300 of them.
        if m := re.fullmatch(r"/api/dialogs/([0-9]{1,19})(/messages)?", path):
            return int(m.group(1)) == dialog_id and (m.group(2) is not None or req.method == "GET")
        if m := re.fullmatch(r"/api/messages/([0-9]+)(/run)?", path):
            try:
                return S.store.get_message(m.group(1))["dialog_id"] == dialog_id
            except StoreError:
                return True  # let the route answer 404
        return False

    @staticmethod
    def deny(req: Request, message: str) -> Response:
        if req.url.path.startswith("/api/") or "text/html" not in req.headers.get("accept", ""):
            return JSONResponse({"error": message}, status_code=401)
        return HTMLResponse(f"<!doctype html><title>Loopbook: log in</title><p>{message}</p>", status_code=401)


# -- app -----------------------------------------------------------------------------------------

async def lifespan(app):
    cfg = S.cfg
    S.store = Store(cfg.data_dir)
    S.token = resolve_token(cfg, S.store.data_dir)
    S.sessions = Sessions()
    S.pool = KernelPool(output_cap_chars=cfg.output_cap, default_timeout=cfg.exec_timeout or None,
                        cull_idle_s=cfg.cull_idle or None,
                        resource_limits={"memory_bytes": cfg.kernel_memory} if cfg.kernel_memory else None)
    S.store.recover_interrupted()
    S.hub = LiveHub()
    S.traces = TraceStore(S.store)
    S.loops = {}
    S.models = Resident(cfg.model, cfg.backend, base_url=cfg.base_url, n_ctx=cfg.n_ctx,
                        n_gpu_layers=cfg.n_gpu_layers, data_dir=S.store.data_dir)
    await S.pool.start()
    loading = asyncio.create_task(load_model())
    try:
        yield
    finally:
        loading.cancel()
        await S.pool.shutdown_all()
        await asyncio.to_thread(S.models.close)
        S.store.close()


async def load_model():
    """Load the resident model in the background, so the page is up at once; say what was chosen."""
    try:
        engine = await S.models.get()
        m = engine.manifest
        print(f"Loopbook: model {m.get('model')} ({m.get('backend')}), {m.get('gpu') or 'CPU'}"
              + (f"; {m['note']}" if m.get("note") else ""), flush=True)
    except ModelError as e:
        print(f"Loopbook: no model loaded: {e}", flush=True)


HDRS = [
    Link(rel="stylesheet", href="/static/app.css"),
    Link(rel="stylesheet", href="/ansi.css"),
    Script(src="/static/vendor/htmx.min.js"),
    Script(src="/static/vendor/htmx-ext-sse.js"),
    Script(src="/static/vendor/codemirror.js"),
    Script(src="/static/editor.js"),
    Script(src="/static/app.js"),
]

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


app = FastHTML(default_hdrs=False, exception_handlers={s: http_error for s in (400, 404, 405, 413, 422, 500, RecursionError)}, hdrs=HDRS, lifespan=lifespan, sess_cls=None,
               secret_key=secrets.token_hex(16), title="Loopbook", htmlkw={"lang": "en"}, canonical=False)
app.add_middleware(AccessMiddleware)
class AssetFiles(StaticFiles):
    """static/, minus the asset build folder (its node_modules is no business of the browser's)."""

    def lookup_path(self, path: str):
        if path.split("/", 1)[0] == "build":
            return "", None
        return super().lookup_path(path)


app.mount("/static", AssetFiles(directory=ROOT / "static"), name="static")
rt = app.route


# -- JSON API ------------------------------------------------------------------------------------

def api(handler):
    """Turn store and input errors into clean JSON errors instead of tracebacks."""
    import functools

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


@rt("/api/dialogs")
@api
async def post(req: Request):
    body = await json_body(req)
    return {"id": S.store.create_dialog(body.get("title", "Untitled"))["id"]}


@rt("/api/dialogs")
@api
def get(q: str = ""):
    return [{k: d[k] for k in ("id", "title", "created_at", "updated_at", "n_messages", "parent_id")}
            for d in S.store.list_dialogs(search=q or None)]


@rt("/api/dialogs/{id}")
@api
def get(id: str):
    d = S.store.get_dialog(id)
    return {**d, "kernel": S.pool.state(dialog_key(d["id"])),
            "messages": [message_json(m) for m in S.store.messages(d["id"])]}


@rt("/api/dialogs/{id}")
@api
async def patch(id: str, req: Request):
    body = await json_body(req)
    d = S.store.get_dialog(id)
    if "settings" in body:
        if not isinstance(body["settings"], dict):
            raise InvalidInput("'settings' must be an object.")
        check_settings({**d["settings"], **body["settings"]}, body["settings"])
    with S.store.transaction():  # title and settings change together, or not at all
        if "title" in body:
            d = S.store.rename_dialog(d["id"], body["title"])
        if "settings" in body:
            d = S.store.update_dialog_settings(d["id"], **body["settings"])
    return d


def check_settings(settings: dict, patch: dict | None = None) -> None:
    """Refuse dialog settings that Ask or Solve would refuse later: a bad value is caught where it is set.
    `settings`: all of them as they would be after the change; `patch`: what the change sets (default: all).
    Null removes a setting, any setting: a key that is not known here (from an older store) can always go."""
    known = {*ASK_KEYS, *LOOP_KEYS, "system_prompt", "adapter"}
    patch = settings if patch is None else patch
    unknown = {k for k, v in patch.items() if v is not None} - known
    if unknown:
        raise InvalidInput(f"Unknown setting(s) {', '.join(sorted(map(str, unknown)))} (set one to null to remove "
                           f"it); known: {', '.join(sorted(known))}.")
    settings = {k: v for k, v in settings.items() if k in known and v is not None}
    if not isinstance(settings.get("system_prompt", ""), str):
        raise InvalidInput("'system_prompt' must be a string.")
    if "adapter" in settings:
        if not isinstance(settings["adapter"], str):
            raise InvalidInput("'adapter' must be the name of a registered adapter.")
        if patch.get("adapter") is not None:
            # Only when chosen: one removed since stays shown as such in the panel, and does not block other saves.
            get_adapter(S.store, settings["adapter"])  # NotFound names it
    sampling_from({k: v for k, v in settings.items() if k in ASK_KEYS})
    loop_config({k: v for k, v in settings.items() if k in LOOP_KEYS})


# The Settings panel's fields and how each is read; check_settings judges the values.
FORM_SETTINGS = {"adapter": str, "rounds": int, "candidates": int, "retry": str, "repeat_resamples": int,
                 "system_prompt": str}


def settings_from_form(form) -> dict:
    """The Settings panel's form as a settings patch: an empty field is None (the app default), an absent
    one (a disabled choice the browser does not send) is left as it is."""
    patch = {}
    for key, kind in FORM_SETTINGS.items():
        if key not in form:
            continue
        value = form.get(key)
        text = value.replace("\r\n", "\n") if isinstance(value, str) else ""
        if not text.strip():
            patch[key] = None
        elif kind is int:
            try:
                patch[key] = int(text)
            except ValueError:
                raise InvalidInput(f"{key} must be a whole number, not {text.strip()[:40]!r}; leave it empty to use "
                                   "the app default.") from None
        else:
            patch[key] = text if key == "system_prompt" else text.strip()
    check_unicode(patch)
    return patch


async def delete_dialog(dialog_id) -> int:
    """A deleted dialog takes its kernel with it."""
    d = S.store.get_dialog(dialog_id)
    await S.pool.shutdown(dialog_key(d["id"]))
    S.store.delete_dialog(d["id"])
    return d["id"]


@rt("/api/dialogs/{id}")
@api
async def delete(id: str):
    return {"deleted": await delete_dialog(id)}


@rt("/api/dialogs/{id}/export")
@api
def get(id: str, format: str = "ipynb"):
    text, media, name = export_dialog(S.store, id, format)
    return Response(text, media_type=media, headers={"Content-Disposition": f'attachment; filename="{name}"'})


def export_options(params: list[tuple[str, object]]):
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
            kept.append(("tokenizer_gguf", str(resolve_model(tokenizer, S.store.data_dir).path)))
        except ModelError as e:
            raise InvalidInput(f"tokenizer {tokenizer}: {e}") from None
    try:
        return options_from_mapping(kept)
    except ExportError as e:
        raise InvalidInput(str(e)) from None


@rt("/api/export")
@api
async def post(req: Request):
    """The traces as a dataset: a zip of JSONL files per format and split, plus the dataset card. Options are
    the export CLI's flags, as query parameters, form fields or a JSON object. A POST, not a GET: it does real
    work, and an <img> in a note or another site's link must not be able to start one."""
    params = list(req.query_params.multi_items())
    kind = req.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind in ("application/x-www-form-urlencoded", "multipart/form-data"):
        params += [(k, v) for k, v in (await req.form()).multi_items() if isinstance(v, str)]
    else:
        params += list((await json_body(req)).items())
    opts = await asyncio.to_thread(export_options, params)
    try:
        chunks, report = await asyncio.to_thread(stream_export_zip, S.store, opts, secrets=[S.token])
    except ExportError as e:
        raise InvalidInput(str(e)) from None
    return StreamingResponse(chunks, media_type="application/zip",
                             headers={"Content-Disposition": 'attachment; filename="loopbook-dataset.zip"'})


@rt("/api/export")
@api
def get():
    return JSONResponse({"error": "The dataset export is a POST (with the same options as query parameters, form "
                                  "fields or a JSON object): a GET must not start work that an <img> could trigger."},
                        status_code=405, headers={"Allow": "POST"})


@rt("/api/dialogs/import")
@api
async def post(req: Request, title: str = ""):
    d = import_ipynb(S.store, await req.body(), title or None, check_settings=check_settings)
    return {"id": d["id"], "title": d["title"], "n_messages": d["n_messages"], "notices": d["notices"]}


@rt("/api/dialogs/{id}/duplicate")
@api
async def post(id: str, req: Request):
    body = await json_body(req)
    return {"id": S.store.duplicate_dialog(id, body.get("title"))["id"]}


@rt("/api/dialogs/{id}/messages")
@api
async def post(id: str, req: Request):
    body = await json_body(req)
    m = S.store.add_message(id, body.get("type", "code"), body.get("source", ""),
                            after=body.get("after"), before=body.get("before"))
    return {"id": m["id"], "position": m["position"], "version": m["version"]}


@rt("/api/messages/{id}")
@api
def get(id: str):
    return message_json(S.store.get_message(id))


@rt("/api/messages/{id}")
@api
async def patch(id: str, req: Request):
    body = await json_body(req)
    allowed = {"source", "type", "pinned", "skipped", "is_test", "reply"}
    unknown = set(body) - allowed - {"version"}
    if unknown:
        raise InvalidInput(f"Cannot change {', '.join(sorted(unknown))}; editable fields: {', '.join(sorted(allowed))}.")
    with S.store.transaction():  # the correction record and the edit land together, or (409) neither does
        S.store.update_message(id, version=body.get("version"))  # the version check alone, before any write
        if "source" in body and isinstance(body["source"], str):
            note_edit(S.store, S.traces, S.store.get_message(id), body["source"])
        m = S.store.update_message(id, **{k: v for k, v in body.items() if k in allowed})
    return message_json(m)


@rt("/api/messages/{id}")
@api
def delete(id: str):
    return {"deleted": S.store.delete_message(id)["id"]}


@rt("/api/messages/{id}/move")
@api
async def post(id: str, req: Request):
    body = await json_body(req)
    m = S.store.move_message(id, after=body.get("after"), before=body.get("before"), offset=body.get("offset"))
    return {"id": m["id"], "position": m["position"]}


async def prepare_kernel(dialog_id: int) -> str:
    """The dialog's kernel, set up with its working directory and the `loopbook` helper; returns its key."""
    key = dialog_key(dialog_id)
    born = S.store.get_dialog(dialog_id)["created_at"]
    env = kernel_env(f"http://127.0.0.1:{S.cfg.port}", S.token, dialog_id, born)
    await S.pool.ensure(key, cwd=S.cfg.kernel_cwd, env=env, init_code=kernel_init_code())
    return key


async def run_message(message_id) -> dict:
    """Run a code message in its dialog's kernel and store what came back."""
    m = S.store.get_message(message_id)
    if m["type"] != "code":
        raise InvalidInput(f"Message {m['id']} is a {m['type']}, not code: only code runs.")
    if not m["source"].strip():
        m = S.store.update_message(m["id"], outputs=[], output_meta={"status": "ok", "empty": True})
        return {"status": "ok", "outputs": [], "execution_count": m["execution_count"], "message": "Empty cell."}
    key = await prepare_kernel(m["dialog_id"])
    res = await S.pool.execute(key, m["source"])
    meta = {"status": res.status, "duration_s": round(res.duration_s, 4), "truncated": res.truncated,
            "original_chars": res.original_chars, "message": res.message}
    S.store.update_message(m["id"], outputs=res.outputs, output_meta=meta, execution_count=res.execution_count)
    return {"status": res.status, "outputs": res.outputs, "execution_count": res.execution_count,
            "message": res.message, "truncated": res.truncated, "duration_s": meta["duration_s"]}


@rt("/api/messages/{id}/run")
@api
async def post(id: str, req: Request):
    m = S.store.get_message(id)
    if req.scope.get("loopbook.kernel_dialog") is not None and S.pool.state(dialog_key(m["dialog_id"])) == "busy":
        # Called from a cell of this kernel: running now would wait on that very cell. Queue it instead.
        task = asyncio.create_task(run_message(m["id"]))
        S.background.add(task)
        task.add_done_callback(S.background.discard)
        return {"status": "queued", "outputs": []}
    return await run_message(m["id"])


ASK_KEYS = ("max_tokens", "temperature", "seed", "top_p", "top_k", "min_p", "repeat_penalty")


ENGINE_KEYS = ("model", "backend", "adapter")


def request_sampling(settings: dict, body: dict):
    """Sampling: the server's defaults, then the dialog's settings, then the request's."""
    defaults = {"max_tokens": S.cfg.max_tokens, "temperature": S.cfg.temperature, **settings}
    return sampling_from(defaults, {k: body.get(k) for k in ASK_KEYS})


async def engine_for(body: dict, settings: dict):
    """The engine a request runs on: its model, and the request's or else the dialog's LoRA adapter."""
    for key in ENGINE_KEYS:
        if body.get(key) is not None and not isinstance(body[key], str):
            raise InvalidInput(f"'{key}' must be a string.")
    if body.get("backend") is not None and body["backend"].lower() not in BACKENDS:
        raise InvalidInput(f"Unknown backend {body['backend'][:40]!r}; Loopbook's backends are "
                           f"{', '.join(BACKENDS)}.")
    adapter = body.get("adapter") or settings.get("adapter")
    lora_path, entry = None, {}
    if adapter:
        # The base's sha256 is checked before llama.cpp sees the adapter: it crashes on another base's.
        lora_path, entry = resolve_adapter(S.store, adapter, model=body.get("model") or S.models.model,
                                           data_dir=S.store.data_dir)
    backend = body["backend"].lower() if body.get("backend") else None
    return await S.models.get(body.get("model"), backend, lora_path=lora_path, manifest_extra=entry)


async def start_ask(message_id, body: dict):
    """Validate, pick the engine, and start answering in the background; returns (message, live log)."""
    m = S.store.get_message(message_id)
    if m["type"] != "prompt":
        raise InvalidInput(f"Message {m['id']} is a {m['type']} cell; only prompts are answered.")
    if S.hub.running(f"reply-{m['id']}"):
        raise InvalidInput("This prompt is already being answered; stop it first.")
    unknown = set(body) - set(ASK_KEYS) - set(ENGINE_KEYS)
    if unknown:
        raise InvalidInput(f"Unknown setting(s) {', '.join(sorted(unknown))}; known: "
                           f"{', '.join(ENGINE_KEYS)}, {', '.join(ASK_KEYS)}.")
    settings = S.store.get_dialog(m["dialog_id"])["settings"]
    sampling = request_sampling(settings, body)
    engine = await engine_for(body, settings)
    live = S.hub.open(f"reply-{m['id']}")
    task = asyncio.create_task(ask(S.store, engine, m["id"], sampling=sampling, live=live))
    return m, live, task


def sse_event(event: str, data: str, id: int | None = None) -> str:
    # One data: line per line of text, so newlines inside tokens survive the trip.
    lines = "".join(f"data: {line}\n" for line in data.split("\n"))
    return (f"id: {id}\n" if id is not None else "") + f"event: {event}\n{lines}\n"


@rt("/api/messages/{id}/ask")
@api
async def post(id: str, req: Request):
    body = await json_body(req)
    m, live, task = await start_ask(id, body)
    if "text/event-stream" in req.headers.get("accept", ""):
        async def events():
            n = 0
            async for batch in live.follow():
                for ev in batch:
                    n += 1
                    if ev["type"] == "token":
                        yield sse_event("token", json.dumps({"text": ev["text"]}), n)
            res = await task
            yield sse_event("done", json.dumps({"reply": res.reply, "status": res.status, "error": res.error,
                                                "figures": res.figures, "manifest": res.manifest}), n + 1)
        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    res = await task
    out = {"reply": res.reply, "status": res.status, "figures": res.figures, "manifest": res.manifest}
    if res.status == "error":
        return JSONResponse({**out, "error": res.error}, status_code=422)
    return out


async def stop_message(message_id) -> bool:
    """Stop whatever works on this message: a loop (generation and code) or a streaming reply."""
    m = S.store.get_message(message_id)
    loop = S.loops.get(m["id"])
    if loop is not None:
        await loop.stop()
        return True
    rid = _text_or((m.get("reply_meta") or {}).get("request_id"))
    return bool(rid and S.models.engine and S.models.engine.cancel(rid))


@rt("/api/messages/{id}/stop")
@api
async def post(id: str):
    return {"stopped": await stop_message(id)}


LOOP_KEYS = ("rounds", "candidates", "retry", "repeat_resamples", "exec_timeout")


async def start_loop(message_id, body: dict, kind: str):
    """Build the Task (Solve on a prompt, Fix on a failed code cell) and run the loop in the background."""
    unknown = set(body) - set(LOOP_KEYS) - set(ASK_KEYS) - set(ENGINE_KEYS)
    if unknown:
        raise InvalidInput(f"Unknown setting(s) {', '.join(sorted(unknown))}.")
    m = S.store.get_message(message_id)
    if m["id"] in S.loops:
        raise InvalidInput("A loop is already running on this cell; stop it first.")
    settings = S.store.get_dialog(m["dialog_id"])["settings"]
    sampling = request_sampling(settings, body)
    base = LoopConfig(rounds=S.cfg.rounds, candidates=S.cfg.candidates, repeat_resamples=S.cfg.repeat_resamples,
                      exec_timeout=min(S.cfg.exec_timeout or 60.0, 60.0), sampling=sampling)
    cfg = loop_config(settings, {k: body.get(k) for k in LOOP_KEYS}, base)
    engine = await engine_for(body, settings)
    await prepare_kernel(m["dialog_id"])
    task = solve_task(S.store, engine, m["id"], sampling.max_tokens) if kind == "solve" else \
        fix_task(S.store, engine, m["id"])
    loop = Loop(engine, S.pool, S.traces, cfg)
    live = S.hub.open(f"loop-{m['id']}")
    S.loops[m["id"]] = loop

    async def run():
        try:
            result = None
            async for ev in loop.run(task):
                if ev["type"] == "done":
                    result = ev["result"]
                else:
                    live.publish(ev if ev["type"] != "attempt" else {"type": "attempt", "attempt": {
                        k: ev["attempt"].get(k) for k in ("id", "round", "candidate", "exec_status", "passed",
                                                          "ename", "evalue", "author")}})
            code_id = land(S.store, S.traces, task, result)
            out = summary(result, code_id)
            live.publish({"type": "done", "summary": out})
            return out
        finally:
            S.loops.pop(m["id"], None)
            live.close()

    return m, live, asyncio.create_task(run())


async def loop_response(req: Request, id: str, kind: str):
    body = await json_body(req)
    m, live, task = await start_loop(id, body, kind)
    if "text/event-stream" in req.headers.get("accept", ""):
        async def events():
            n = 0
            async for batch in live.follow():
                for ev in batch:
                    n += 1
                    yield sse_event(ev["type"], json.dumps(ev), n)
        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    return await task


@rt("/api/messages/{id}/solve")
@api
async def post(id: str, req: Request):
    return await loop_response(req, id, "solve")


@rt("/api/messages/{id}/fix")
@api
async def post(id: str, req: Request):
    return await loop_response(req, id, "fix")


@rt("/api/traces/{id}")
@api
def get(id: str):
    return S.traces.get_trace(id)


@rt("/api/messages/{id}/traces")
@api
def get(id: str):
    return [{k: t[k] for k in ("id", "kind", "status", "stop_reason", "rounds", "n_attempts", "code_message_id",
                               "created_at", "finished_at")} for t in S.traces.traces_for_message(S.store.get_message(id)["id"])]


@rt("/api/model")
@api
def get():
    status = S.models.status()
    if S.models.engine is not None:
        status["manifest"] = S.models.engine.manifest
    return status


async def kernel_action(dialog_id, action: str) -> str:
    """Interrupt or restart a dialog's kernel; returns its state afterwards."""
    key = dialog_key(S.store.get_dialog(dialog_id)["id"])
    await getattr(S.pool, action)(key)
    return S.pool.state(key)


@rt("/api/dialogs/{id}/interrupt")
@api
async def post(id: str):
    return {"kernel": await kernel_action(id, "interrupt")}


@rt("/api/dialogs/{id}/restart")
@api
async def post(id: str):
    return {"kernel": await kernel_action(id, "restart")}


@rt("/api/dialogs/{id}/kernel")
@api
def get(id: str):
    d = S.store.get_dialog(id)
    key = dialog_key(d["id"])
    return {"state": S.pool.state(key), "info": S.pool.info(key)}


# -- page components ------------------------------------------------------------------------------
# Cells are rendered as plain strings, not FastHTML elements: a 1,000-cell dialog must render in well
# under 300 ms, and building ~18 elements per cell as FT objects took 2.6 s (profiled). Every value
# that reaches the markup goes through `_e` (escape) or the sanitizing renderers of dialog.render.
# Cells carry no hx-* attributes: static/app.js drives them (keys and toolbar), so htmx has nothing
# to process when a long dialog opens.

TYPE_LABELS = {"code": "Code", "note": "Note", "prompt": "Prompt"}
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


def OutputView(o: dict, mid: int = 0, n: int = 0, full: bool = False) -> str:
    """One nbformat output as safe HTML; long text collapsed unless `full`."""
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


def Outputs(m: dict) -> str:
    meta = m.get("output_meta") if isinstance(m.get("output_meta"), dict) else {}
    status = _text_or(meta.get("status"))
    parts = []
    if status in ("timeout", "died", "interrupted") and meta.get("message"):
        parts.append(f'<div class="out-banner out-{_e(status)}">{_e(meta["message"])}</div>')
    parts.extend(OutputView(o, m["id"], n) for n, o in enumerate(m.get("outputs") or []) if isinstance(o, dict))
    if meta.get("truncated"):
        produced = _number(meta.get("original_chars"))
        parts.append('<div class="out-banner out-truncated">Output capped: '
                     + (f"{int(produced):,} characters produced, " if produced is not None else "")
                     + 'head and tail kept.</div>')
    return f'<div id="out-{m["id"]}" class="outputs status-{_e(status or "none")}">{"".join(parts)}</div>'


def ExecCount(m: dict) -> str:
    count = m.get("execution_count")
    return f'<span class="exec-count">[{count if count is not None else "&nbsp;"}]</span>'


def Figures(meta: dict):
    f = meta.get("figures")
    if not isinstance(f, dict) or not f:
        return None
    ttft, tps, prompt, cached, generated = (_number(f.get(k)) for k in (
        "ttft_s", "tokens_per_s", "prompt_tokens", "cached_prompt_tokens", "completion_tokens"))
    bits = [(_text_or(meta.get("model")) or "").strip(),
            f"TTFT {ttft:.2f} s" if ttft is not None else "",
            f"{tps:.1f} tok/s" if tps else "",
            f"{int(prompt)} prompt tokens, {int(cached or 0)} cached" if prompt is not None else "",
            f"{int(generated)} generated" if generated is not None else ""]
    return Div(" · ".join(b for b in bits if b), cls="figures")


def Reply(m: dict, streaming: bool = False):
    meta = m.get("reply_meta") if isinstance(m.get("reply_meta"), dict) else {}
    mid = m["id"]
    if streaming:
        return to_xml(Div(
            Div(Span("Answering", cls="live-note"), Button("Stop", type="button", data_act="stop", cls="stop"),
                cls="reply-bar"),
            Pre(cls="reply-live", sse_swap="token", hx_swap="beforeend"),
            Div(sse_swap="done", hx_target=f"#reply-{mid}", hx_swap="outerHTML"),
            id=f"reply-{mid}", cls="reply streaming", hx_ext="sse", sse_connect=f"/cells/{mid}/stream",
            sse_close="done"), indent=False)
    status = _text_or(meta.get("status"), "done")
    if not m.get("reply") and status not in ("error", "interrupted", "cancelled"):
        return Safe(f'<div id="reply-{mid}" class="reply empty"></div>')
    notes = {"interrupted": "The server stopped while this reply was being written; it is incomplete.",
             "cancelled": "Stopped.", "error": f"The model failed: {meta.get('error')}"}
    note = f'<div class="reply-note note-{_e(status)}">{_e(notes[status])}</div>' if status in notes else ""
    figures = Figures(meta)
    return Safe(
        f'<div id="reply-{mid}" class="reply status-{_e(status)}">{note}<div class="md">{_md(m.get("reply") or "")}</div>'
        f'<div class="reply-foot"><span><button type="button" data-act="extract" class="extract" tabindex="-1" '
        f'title="Put the reply\'s code blocks in new code cells">Code to cells</button> '
        f'<button type="button" data-act="edit-reply" class="edit-reply" tabindex="-1" '
        f'title="Edit the reply by hand (the model sees your version from now on)">Edit reply</button></span>'
        f'{to_xml(figures, indent=False) if figures else ""}</div></div>')


def ReplyEditor(m: dict):
    return Div(Textarea(m.get("reply") or "", name="reply", cls="reply-source", rows=max(4, (m.get("reply") or "").count("\n") + 2),
                        aria_label="Reply"),
               Div(Button("Save reply", type="button", data_act="save-reply", cls="save-reply"),
                   Button("Cancel", type="button", data_act="cancel-reply", cls="cancel-reply"), cls="reply-foot"),
               id=f"reply-{m['id']}", cls="reply editing")


STATUS_WORDS = {"ok": "passed", "error": "error", "timeout": "timed out", "died": "kernel died",
                "interrupted": "interrupted", "no_code": "no code", "syntax_error": "syntax error",
                "check_failed": "check failed"}


def AttemptLine(a: dict):
    what = STATUS_WORDS.get(a.get("exec_status"), a.get("exec_status"))
    detail = f": {a.get('ename')}: {a.get('evalue')}" if a.get("ename") else ""
    who = " (your code)" if a.get("author") == "human" else ""
    return Li(Span(f"round {a['round']}" + (f" · candidate {a['candidate']}" if a.get("candidate") else "") + who,
                   cls="attempt-round"),
              Span(what + detail, cls=f"attempt-status st-{a.get('exec_status')}"), cls="attempt")


def latest_traces(dialog_id: int) -> dict[int, dict]:
    """The newest Solve/Fix trace of each message of a dialog, in one query (the page shows one per cell)."""
    out: dict[int, dict] = {}
    for t in S.traces.iter_traces("dialog_id = ?", (dialog_id,)):
        if t.get("message_id") is not None:
            out[t["message_id"]] = t
    return out


def LoopView(m: dict, streaming: bool = False, trace: dict | None | bool = False):
    """The attempts of the latest Solve/Fix on this cell, collapsed; live while the loop runs.
    `trace`: that trace when the caller looked it up already (None: there is none)."""
    mid = m["id"]
    if streaming:
        return to_xml(Div(
            Div(Span("Solving: model code runs in this dialog's kernel", cls="loop-note live-note"),
                Button("Stop", type="button", data_act="stop", cls="stop"), cls="reply-bar"),
            Ul(cls="attempts live", sse_swap="attempt", hx_swap="beforeend"),
            Pre(cls="reply-live", sse_swap="token", hx_swap="beforeend"),
            Div(sse_swap="done", hx_target=f"#cell-{mid}", hx_swap="outerHTML"),
            id=f"loop-{mid}", cls="loop streaming", hx_ext="sse", sse_connect=f"/cells/{mid}/loop-stream",
            sse_close="done"), indent=False)
    if trace is False:
        traces = [t for t in S.traces.traces_for_message(mid) if t["message_id"] == mid]
        trace = traces[-1] if traces else None
    if not trace:
        return Safe(f'<div id="loop-{mid}" class="loop empty"></div>')
    t = trace
    attempts = S.traces.attempts(t["id"])
    verdict = {"passed": "passed", "failed": "did not pass", "stopped": "stopped",
               "interrupted": "interrupted", "running": "running"}.get(t["status"], t["status"])
    reason = {"budget": "round budget spent", "no_progress": "same error twice", "no_code": "no code twice",
              "stopped": "stopped", "passed": ""}.get(t.get("stop_reason") or "", "")
    head = f"{t['kind'].capitalize()} {verdict} after {t['n_attempts']} attempt{'s' if t['n_attempts'] != 1 else ''}" \
        + (f" ({reason})" if reason else "")
    return to_xml(Div(Details(Summary(head, A("trace", href=f"/traces/{t['id']}", cls="trace-link")),
                                     Ul(*[AttemptLine(a) for a in attempts], cls="attempts")),
                             id=f"loop-{mid}", cls=f"loop status-{t['status']}"), indent=False)


def Cell(m: dict, *, reply_streaming: bool = False, loop_streaming: bool = False, trace: dict | None | bool = False,
         lazy: bool = False):
    """One cell as the page shows it. `trace`: its latest Solve/Fix trace, when the caller batched the lookup.
    `lazy`: its editor is made when it nears the screen (static/app.js), not when the page loads."""
    mid, t, src = m["id"], m["type"], m["source"]
    lang = "python" if t == "code" else "markdown"
    flags = [f for f in ("pinned", "skipped") if m.get(f)] + (["test"] if m.get("is_test") else [])
    gutter = ExecCount(m) if t == "code" else f'<span class="kind">{t}</span>'
    gutter += "".join(f'<span class="flag flag-{f}">{f}</span>' for f in flags)
    placeholder = {"code": "code", "note": "a note (markdown)", "prompt": "ask the model (markdown)"}[t]
    # No toolbar here: static/app.js puts one shared toolbar in the selected cell (half of each cell's bytes).
    body = [f'<textarea class="cell-source{"-lazy" if lazy else ""}" name="source" data-lang="{lang}" rows="{src.count(chr(10)) + 1}" '
            f'aria-label="{t} source" placeholder="{placeholder}">\n{escape(src, quote=False)}</textarea>']  # the parser drops that one newline, not the source's own
    if t != "code":
        view = _md(src) if src.strip() else f'<p class="placeholder">Empty {t}: press Enter to write</p>'
        body.append(f'<div class="md-view md">{view}</div>')
    if t == "code":
        body.append(Outputs(m))
    elif t == "prompt":
        body.append(Reply(m, streaming=reply_streaming))
    if t != "note":
        body.append(LoopView(m, streaming=loop_streaming, trace=trace))
    cls = " ".join(["cell", f"cell-{t}", *flags])
    return Safe(f'<article class="{cls}" id="cell-{mid}" data-id="{mid}" data-type="{t}" tabindex="-1" '
                  f'aria-label="{t} cell"><div class="gutter">{gutter}</div><div class="cell-body">{"".join(body)}'
                  f'</div></article>')


EAGER_EDITORS = 40  # cells whose editor is made at page load; the rest wait until they near the screen


def Cells(dialog_id: int, messages: list[dict]):
    # A CodeMirror editor costs the browser ~4 ms to make: 1,000 at load kept a long dialog blank for 4 s.
    traces = latest_traces(dialog_id)
    return Safe(f'<div id="cells" data-dialog="{dialog_id}">'
                + "".join(Cell(m, trace=traces.get(m["id"]), lazy=n >= EAGER_EDITORS) for n, m in enumerate(messages))
                + "</div>")


def AddBar(dialog_id: int):
    return Div(*[Button(f"+ {TYPE_LABELS[t]}", type="button", data_act=f"add-{t}", cls=f"add-{t}", tabindex="-1")
                 for t in MESSAGE_TYPES], cls="add-bar")


KEYS = [
    ("Command mode (a cell is selected; Esc gets you here)", [
        ("Enter", "edit the cell"), ("Shift+Enter", "run, select the next cell (adds one at the end)"),
        ("Ctrl/Cmd+Enter", "run in place"), ("Alt+Enter", "run, add a cell below"),
        ("s  ·  Ctrl+Shift+Enter", "Solve a prompt (code runs here)"), ("f", "Fix a failed code cell"),
        ("↑ ↓  ·  k j", "select the cell above / below"), ("Home  ·  End", "first / last cell"),
        ("Ctrl/Cmd+Shift+↑ ↓", "move the cell up / down"),
        ("a  ·  b", "add a cell above / below"), ("d d", "delete the cell"), ("z", "undo the last delete"),
        ("x  ·  c  ·  v  ·  Shift+V", "cut, copy, paste below / above"),
        ("y  ·  m  ·  p", "make the cell code, note, prompt"),
        ("Shift+P  ·  Shift+S", "pin (survives truncation) · skip (left out of the context)"),
        ("r", "run all code cells above"), ("i i", "interrupt the kernel, stop the model"),
        ("0 0", "restart the kernel"), ("?  ·  h", "this list")]),
    ("Edit mode (typing in a cell)", [
        ("Esc", "back to command mode (a note or prompt shows rendered)"),
        ("Shift+Enter  ·  Ctrl+Enter  ·  Alt+Enter", "as in command mode"),
        ("Ctrl+Shift+Enter", "Solve a prompt / Fix a code cell"), ("Tab  ·  Shift+Tab", "indent / dedent"),
        ("Ctrl+Space", "complete"), ("Ctrl+S", "save now (cells also save as you type)")]),
]


def KeyHelp():
    def section(title, keys):
        return Div(H2(title), *[Div(Span(k, cls="keys"), Span(what, cls="what"), cls="key-row") for k, what in keys],
                   cls="key-section")
    return Div(Div(Div(H2("Keyboard"), Button("Close", type="button", data_act="help", cls="close"), cls="help-head"),
                   *[section(t, keys) for t, keys in KEYS], cls="help-box"),
               id="keys-help", cls="overlay", hidden=True, role="dialog", aria_label="Keyboard shortcuts")


def ModelBadge():
    st = S.models.status()
    text = {"ready": f"model: {st.get('model')}", "loading": f"model: loading {st.get('model') or ''}",
            "error": "model: not loaded", "idle": "model: not loaded"}[st["state"]]
    title = st.get("error") or " · ".join(x for x in (st.get("gpu"), st.get("note")) if x)
    extra = {} if st["state"] == "ready" else {"hx_get": "/model-badge", "hx_trigger": "load delay:2s",
                                                "hx_swap": "outerHTML"}
    return Span(text, id="model-state", cls=f"model-state model-{st['state']}", title=title, **extra)


def KernelBadge(dialog_id: int):
    state = S.pool.state(dialog_key(dialog_id))
    words = {"none": "not started"}.get(state, state)
    return Span(f"kernel: {words}", id="kernel-state", cls=f"kernel-state kernel-{state}", data_state=state,
                role="status", aria_live="polite")


def AutorunNote(d: dict, *, oob: bool = False):
    adapter = _text_or(d["settings"].get("adapter"))
    text = "Solve and Fix run model code in this kernel" + (f" · adapter {adapter}" if adapter else "") \
        + f" · cwd {S.cfg.kernel_cwd or os.getcwd()}"
    return Span(text, id="autorun-note", cls="autorun-note" + (" has-adapter" if adapter else ""),
                title=f"{text}. Model code runs automatically only inside Solve and Fix; elsewhere it waits for Run.",
                **({"hx_swap_oob": "true"} if oob else {}))


def AdapterSelect(current: str | None):
    """Every registered adapter; those trained on another base than the loaded model are shown but disabled."""
    current = _text_or(current)
    manifest = S.models.engine.manifest if S.models.engine is not None else None
    sha = manifest.get("sha256") if manifest else None
    loaded = (manifest or {}).get("file_name") or (manifest or {}).get("model") or "the loaded model"
    options = [Option("none (base model)", value="", selected=not current)]
    names = set()
    for a in list_adapters(S.store):
        names.add(a["name"])
        base = a.get("base_model") or a["base_file"]
        if manifest is None:
            fits, why = True, f"For {base}; checked against the model when it is used (no model is loaded yet)."
        elif sha is None:
            fits, why = False, f"Needs the in-process GGUF base {base}; {loaded} has no file to load it onto."
        else:
            fits = a["base_sha256"] == sha
            why = f"For {base}." if fits else \
                f"Needs base model {base} (sha256 {a['base_sha256'][:12]}...); the loaded model is {loaded}."
        options.append(Option(f"{a['name']} · {base}", value=a["name"], selected=a["name"] == current,
                              disabled=not fits, title=why))
    if current and current not in names:
        # Disabled, so the browser does not send it back: saving other fields leaves it as it is.
        options.append(Option(f"{current} (no longer registered)", value=current, selected=True, disabled=True,
                              title="Choose another adapter, or none."))
    return Select(*options, name="adapter", cls="settings-adapter", aria_label="Adapter")


def SettingsPanel(d: dict, *, open: bool = False, oob: bool = False):
    """The dialog's settings as a form; an empty field means the app default, shown as the placeholder."""
    s = d["settings"]
    prompt = _text_or(s.get("system_prompt"))

    def number(key: str, label: str, low: int, high: int, default: int):
        value = s.get(key)
        # A value set through the API may lie beyond the form's range; the form must still submit it.
        high = max(high, value) if isinstance(value, int) else high
        return Label(Span(label), Input(type="number", name=key, min=low, max=high, step=1,
                                        value="" if value is None else str(value), placeholder=f"default {default}"),
                     cls="field")

    # Compact, as the cells are: no whitespace text between the fields.
    return Safe(to_xml(Details(
        Summary("Settings"),
        Form(Label(Span("Adapter"), AdapterSelect(s.get("adapter")), cls="field"),
             number("rounds", "Feedback rounds", 0, 10, S.cfg.rounds),
             number("candidates", "Candidates", 1, 8, S.cfg.candidates),
             Label(Span("Retry"), Select(Option(f"default ({LoopConfig.retry})", value=""),
                                         *[Option(m, value=m, selected=m == s.get("retry")) for m in RETRY_MODES],
                                         name="retry"), cls="field"),
             number("repeat_resamples", "Resample repeats", 0, 8, S.cfg.repeat_resamples),
             # The parser drops one newline after <textarea>; this one, so a prompt's own first newline stays.
             Label(Span("System prompt"), Textarea("\n" + prompt if prompt else "",
                                                   name="system_prompt", rows=5, placeholder=DEFAULT_SYSTEM_PROMPT),
                   cls="field wide"),
             Div(Span("Empty fields use the app default.", cls="hint"), Button("Save settings", type="submit"),
                 cls="settings-foot"),
             hx_post=f"/d/{d['id']}/settings", hx_target="#toast", hx_swap="beforeend", cls="menu settings-form"),
        id="settings", cls="settings", open=open, **({"hx_swap_oob": "true"} if oob else {})), indent=False))


def DialogHeader(d: dict):
    did = d["id"]
    return Header(
        A("Loopbook", href="/", cls="brand"),
        Form(Input(name="title", value=d["title"], cls="dialog-title", aria_label="Dialog title"),
             hx_post=f"/d/{did}/rename", hx_trigger="change, submit", hx_swap="none", cls="rename"),
        KernelBadge(did),
        ModelBadge(),
        AutorunNote(d),
        Div(Button("Run all", type="button", data_act="run-all", cls="run-all", title="Run every code cell in order"),
            Button("Interrupt", type="button", data_act="interrupt", cls="interrupt", title="Interrupt (i i)"),
            Button("Restart", type="button", data_act="restart", cls="restart", title="Restart the kernel (0 0)"),
            Button("Duplicate", hx_post=f"/d/{did}/duplicate", cls="duplicate", title="Branch this dialog"),
            Details(Summary("Export"),
                    Div(A(".ipynb", href=f"/d/{did}/export.ipynb", cls="export-ipynb"),
                        A(".py", href=f"/d/{did}/export.py", cls="export-py"),
                        A(".md", href=f"/d/{did}/export.md", cls="export-md"), cls="menu"), cls="export"),
            SettingsPanel(d),
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


@rt("/favicon.ico")
def get():
    return Response(ICON_SVG, media_type="image/svg+xml", headers={"Cache-Control": "max-age=86400"})


def LogoutButton():
    return Form(Button("Log out", type="submit", title="End this browser's login (the start-up URL logs in again)"),
                action="/logout", method="post", cls="logout")


@rt("/logout")
def post(req: Request):
    """End this browser's login: its session is dropped here and its cookie cleared. (A POST, and from this
    origin only, like every write: another site cannot log you out.)"""
    sid = req.scope.get("loopbook.session")
    if sid:
        S.sessions.drop(sid)
    # A bare page, like the log-in one: a logged-out browser may load none of the app's own files.
    resp = HTMLResponse("<!doctype html><html lang=en><title>Loopbook: logged out</title><h1>Logged out</h1><p>This "
                        "browser's login has ended. To log in again, open the URL Loopbook printed at start-up (it "
                        "ends in ?token=...).</p></html>")
    resp.delete_cookie(session_cookie(), path="/", httponly=True, samesite="strict")
    return resp



def Home(q: str = "", error: str | None = None):
    dialogs = S.store.list_dialogs(search=q or None)
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


@rt("/")
def get(q: str = ""):
    return Home(q)


@rt("/dialogs")
def post(title: str = "Untitled"):
    try:
        d = S.store.create_dialog(title)
    except StoreError as e:
        return PlainTextResponse(str(e), status_code=e.status)
    S.store.add_message(d["id"], "code", "")  # a new notebook opens on an empty cell, as in Jupyter
    return RedirectResponse(f"/d/{d['id']}", status_code=303)


# What an import had to change, shown once when the new dialog opens.
FLASH: dict[int, list[str]] = {}


@rt("/d/{id}")
def get(id: str):
    try:
        d = S.store.get_dialog(id)
    except StoreError as e:
        return HTMLResponse(f"<!doctype html><title>Loopbook</title><p>{escape(str(e))}</p><p><a href='/'>All dialogs</a></p>",
                            status_code=e.status)
    notices = FLASH.pop(d["id"], [])
    return (Title(f"{d['title']} · Loopbook"), REFERRER,
            DialogHeader(d),
            Main(Cells(d["id"], S.store.messages(d["id"])), AddBar(d["id"]), cls="dialog", data_dialog=str(d["id"])),
            KeyHelp(),
            Div(*[Div(n, cls="toast-msg") for n in notices], id="toast", cls="toast", role="status", aria_live="polite"))


@rt("/dialogs/import")
async def post(req: Request):
    form = await req.form()
    upload = form.get("file")
    if upload is None or not hasattr(upload, "read"):
        return full_page(Home(error="Choose a .ipynb file to import."), status_code=400)
    try:
        d = import_ipynb(S.store, await upload.read(), upload.filename or None, check_settings=check_settings)
    except StoreError as e:
        return full_page(Home(error=f"Nothing was imported. {e}"), status_code=e.status)
    if d.get("notices"):
        FLASH[d["id"]] = d["notices"]
    return RedirectResponse(f"/d/{d['id']}", status_code=303)


def full_page(parts: tuple, status_code: int = 200) -> HTMLResponse:
    """A whole page with a status other than 200 (FastHTML's own wrapping always answers 200)."""
    head = [p for p in parts if getattr(p, "tag", "") in ("title", "meta")]
    body = [p for p in parts if p is not None and getattr(p, "tag", "") not in ("title", "meta")]
    return HTMLResponse("<!doctype html>\n" + to_xml(Html(Head(Meta(charset="utf-8"), *head, *HDRS), Body(*body),
                                                         lang="en")), status_code=status_code)


@rt("/d/{id}")
@page
async def delete(id: str):
    await delete_dialog(id)
    return ""


@rt("/d/{id}/duplicate")
@page
def post(id: str):
    d = S.store.duplicate_dialog(id)
    return Response("", headers={"HX-Redirect": f"/d/{d['id']}"})


@rt("/d/{id}/export.{fmt}")
def get(id: str, fmt: str):
    try:
        text, media, name = export_dialog(S.store, id, fmt)
    except StoreError as e:
        return PlainTextResponse(str(e), status_code=e.status)
    return Response(text, media_type=media, headers={"Content-Disposition": f'attachment; filename="{name}"'})


@rt("/d/{id}/rename")
@page
def post(id: str, title: str = ""):
    S.store.rename_dialog(id, title)
    return ""


@rt("/d/{id}/settings")
@page
async def post(id: str, req: Request):
    """Save the Settings panel: the same check as the API, then a toast, the panel and the header note."""
    d = S.store.get_dialog(id)
    patch = settings_from_form(await req.form())
    check_settings({**d["settings"], **patch}, patch)
    d = S.store.update_dialog_settings(d["id"], **patch)
    return Div("Settings saved", cls="toast-msg"), SettingsPanel(d, open=True, oob=True), AutorunNote(d, oob=True)


@rt("/d/{id}/cells")
@page
def post(id: str, type: str = "code", after: str = "", before: str = ""):
    m = S.store.add_message(id, type, "", after=after or None, before=before or None)
    return Cell(m)


# The text each cell got from the page's last save, and from which tab (this process only).
PAGE_WRITES: dict[int, tuple[str, str]] = {}
TAB_HEADER = "x-loopbook-tab"


def save_source(id: str, source: str | None, base: str | None, tab: str | None = None, *, then: str = "") -> dict:
    """The page's save, and the save before a run, an ask or a solve. `base` is the text this tab last had
    from the server: if the cell's text changed since (another tab, the API, the kernel helper, a Fix),
    refuse rather than overwrite, so the last writer wins only when it saw what it replaces. A tab's own
    earlier save (still on its way back to it when it sent this one) is no conflict. `then`: what the
    request would have done next ("run"), for the message."""
    if source is None:
        raise InvalidInput("Nothing to save: send the cell's text as 'source'.")
    if base is None:
        # Without it there is no telling a stale tab from a fresh one: refuse rather than risk a newer edit.
        raise InvalidInput("This save does not say which text it replaces ('base'), so nothing was saved. Reload "
                           "the page and try again.")
    with S.store.transaction():
        m = S.store.get_message(id)
        own = tab is not None and PAGE_WRITES.get(m["id"]) == (tab, m["source"])
        if not own and not same_text(base, m["source"]) and not same_text(source, m["source"]):
            raise Conflict(f"Cell {m['id']} was changed elsewhere (another tab, the API, or code in the kernel) "
                           f"since this page loaded it, so this page's text was not saved"
                           + (f" and the cell was not {then}" if then else "")
                           + ". Reload the page to see the newer text; if you changed the cell here, copy your "
                             "text first and apply it again.")
        note_edit(S.store, S.traces, m, source)
        m = S.store.update_message(m["id"], source=source)
        if tab:
            PAGE_WRITES[m["id"]] = (tab, m["source"])
        return m


def same_text(a: str, b: str) -> bool:
    # A browser's textarea turns CR LF into LF and drops one leading newline.
    def norm(t: str) -> str:
        t = t.replace("\r\n", "\n").replace("\r", "\n")
        return t[1:] if t.startswith("\n") else t
    return norm(a) == norm(b)


@rt("/cells/{id}")
@page
def put(id: str, req: Request, source: str | None = None, base: str | None = None):
    save_source(id, source, base, req.headers.get(TAB_HEADER))
    return ""


@rt("/cells/{id}/save")
@page
def post(id: str, req: Request, source: str | None = None, base: str | None = None):
    """Save and re-render: a note or prompt leaving edit mode shows its markdown rendered."""
    return Cell(save_source(id, source, base, req.headers.get(TAB_HEADER)))


# Deleted cells, newest last, so `z` can bring one back with its outputs and reply (this process only).
TRASH: dict[int, dict] = {}
TRASH_KEEP = 200
COPIED_FIELDS = ("source", "outputs", "output_meta", "execution_count", "reply", "reply_meta", "pinned", "skipped",
                 "is_test", "author")


@rt("/cells/{id}")
@page
def delete(id: str):
    m = S.store.delete_message(id)
    TRASH[m["id"]] = m
    while len(TRASH) > TRASH_KEEP:
        TRASH.pop(next(iter(TRASH)))
    return ""


def _copy_into(m: dict, dialog: str, after: str, before: str) -> dict:
    fields = {k: m[k] for k in COPIED_FIELDS if k in m}
    return S.store.add_message(dialog or m["dialog_id"], m["type"], after=after or None, before=before or None, **fields)


@rt("/cells/{id}/restore")
@page
def post(id: str, after: str = "", before: str = ""):
    """Undo a delete: the cell comes back where it was (after `after` or before `before`), outputs included."""
    m = TRASH.get(int(id)) if id.isdigit() else None
    if m is None:
        raise InvalidInput("That cell can no longer be restored (only deletes since the server started can be undone).")
    restored = _copy_into(m, "", after, before)
    TRASH.pop(m["id"], None)
    return Cell(restored)


@rt("/cells/{id}/paste")
@page
def post(id: str, dialog: str = "", after: str = "", before: str = ""):
    """A copy of cell `id` (still there, or cut) in `dialog`, after or before a cell; outputs included."""
    m = TRASH.get(int(id)) if id.isdigit() and int(id) in TRASH else S.store.get_message(id)
    return Cell(_copy_into(m, dialog, after, before))


@rt("/cells/{id}/type")
@page
def post(id: str, type: str):
    return Cell(S.store.update_message(id, type=type))


@rt("/cells/{id}/toggle")
@page
def post(id: str, field: str):
    if field not in ("pinned", "skipped", "is_test"):
        raise InvalidInput("Only 'pinned', 'skipped' and 'is_test' can be toggled.")
    m = S.store.get_message(id)
    return Cell(S.store.update_message(id, **{field: not m[field]}))


def whole_number(name: str, text: str) -> int:
    """A query or form value that must be a whole number (taken as text: FastHTML's own conversion answers
    404 with Python's "invalid literal for int()")."""
    if not re.fullmatch(r"[+-]?[0-9]{1,18}", text.strip()):
        raise InvalidInput(f"'{name}' must be a whole number; got {text[:40]!r}.")
    return int(text)


@rt("/cells/{id}/move")
@page
def post(id: str, offset: str = "0"):
    """Move by `offset` places; the page moves the element itself, so nothing is re-rendered."""
    m = S.store.move_message(id, offset=whole_number("offset", offset))
    return Response("", headers={"X-Position": str(m["position"])})


@rt("/cells/{id}/run")
@page
async def post(id: str, req: Request, source: str | None = None, base: str | None = None):
    if source is not None:
        save_source(id, source, base, req.headers.get(TAB_HEADER), then="run")
    await run_message(id)
    return Cell(S.store.get_message(id))


@rt("/cells/{id}/output/{n}")
@page
def get(id: str, n: str):
    """One output in full: what "show all" fetches for a collapsed output."""
    n = whole_number("n", n)
    m = S.store.get_message(id)
    outputs = m.get("outputs") or []
    if not 0 <= n < len(outputs):
        raise InvalidInput(f"Cell {m['id']} has no output {n}; run it again.")
    return Safe(OutputView(outputs[n], m["id"], n, full=True))


@rt("/d/{id}/interrupt")
@page
async def post(id: str):
    did = S.store.get_dialog(id)["id"]
    await kernel_action(did, "interrupt")
    return KernelBadge(did)


@rt("/d/{id}/restart")
@page
async def post(id: str):
    did = S.store.get_dialog(id)["id"]
    await kernel_action(did, "restart")
    return KernelBadge(did)


@rt("/d/{id}/kernel")
@page
def get(id: str):
    return KernelBadge(S.store.get_dialog(id)["id"])


@rt("/cells/{id}/ask")
@page
async def post(id: str, req: Request, source: str | None = None, base: str | None = None):
    if source is not None:
        save_source(id, source, base, req.headers.get(TAB_HEADER), then="asked")
    try:
        m, _, _ = await start_ask(id, {})
    except ModelError as e:
        raise InvalidInput(f"No model to answer with: {e}") from None
    return Cell(m, reply_streaming=True)


@rt("/cells/{id}/stop")
@page
async def post(id: str):
    await stop_message(id)
    return ""


def last_event_id(req: Request) -> int:
    """Where a reconnecting EventSource left off, so it is not sent the same tokens twice."""
    value = req.headers.get("last-event-id") or "0"
    # ASCII digits only: str.isdigit() also takes "²", which int() refuses.
    return int(value) if re.fullmatch(r"[0-9]{1,11}", value) else 0


@rt("/cells/{id}/stream")
async def get(id: str, req: Request):
    live = S.hub.get(f"reply-{id}")
    start = last_event_id(req)

    async def events():
        n = start
        if live is not None:
            async for batch in live.follow(start):
                text = "".join(ev["text"] for ev in batch if ev["type"] == "token")
                n += len(batch)
                if text:
                    yield sse_event("token", escape(text), n)
        try:
            final = to_xml(Reply(S.store.get_message(id)))
        except StoreError as e:
            final = to_xml(Div(str(e), id=f"reply-{id}", cls="reply"))
        yield sse_event("done", final, n + 1)

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


@rt("/cells/{id}/reply")
@page
def get(id: str, edit: str = ""):
    m = S.store.get_message(id)
    return ReplyEditor(m) if edit else Reply(m)


@rt("/cells/{id}/reply")
@page
def post(id: str, reply: str | None = None, base: str | None = None):
    """A reply edited by hand. `base`: the reply as the editor opened with it, as with a cell's `base`."""
    if reply is None or base is None:
        raise InvalidInput("Send the edited reply as 'reply' and the reply you started from as 'base'; nothing was "
                           "saved.")
    with S.store.transaction():
        m = S.store.get_message(id)
        if m["type"] != "prompt":
            raise InvalidInput("Only a prompt has a reply to edit.")
        if not same_text(base, m["reply"]) and not same_text(reply, m["reply"]):
            raise Conflict(f"The reply of cell {m['id']} changed since you opened it for editing (the model answered "
                           "again, or another tab); yours was not saved. Copy your text, press Cancel to see the "
                           "newer reply, and edit that.")
        meta = {**(m.get("reply_meta") or {}), "status": "done", "edited_by_hand": True}
        m = S.store.update_message(m["id"], reply=reply, reply_meta=meta)
    return Reply(m)


@rt("/cells/{id}/extract")
@page
def post(id: str):
    from execfeedback.workspace.ask import code_blocks

    m = S.store.get_message(id)
    blocks = code_blocks(m.get("reply") or "")
    if not blocks:
        raise InvalidInput("The reply has no code blocks.")
    cells, after = [], m["id"]
    with S.store.transaction():  # all the reply's cells, or none
        for code in blocks:
            c = S.store.add_message(m["dialog_id"], "code", code.rstrip("\n"), after=after, author="model")
            cells.append(c)
            after = c["id"]
    return tuple(Cell(c) for c in cells)


@rt("/cells/{id}/solve")
@page
async def post(id: str, req: Request, source: str | None = None, base: str | None = None):
    if source is not None:
        save_source(id, source, base, req.headers.get(TAB_HEADER), then="solved")
    try:
        m, _, _ = await start_loop(id, {}, "solve")
    except ModelError as e:
        raise InvalidInput(f"No model to solve with: {e}") from None
    return Cell(S.store.get_message(m["id"]), loop_streaming=True)


@rt("/cells/{id}/fix")
@page
async def post(id: str):
    try:
        m, _, _ = await start_loop(id, {}, "fix")
    except ModelError as e:
        raise InvalidInput(f"No model to fix with: {e}") from None
    return Cell(S.store.get_message(m["id"]), loop_streaming=True)


@rt("/cells/{id}/loop-stream")
async def get(id: str, req: Request):
    live = S.hub.get(f"loop-{id}")
    start = last_event_id(req)

    async def events():
        n = start
        if live is not None:
            async for batch in live.follow(start):
                text, lines = [], []
                for ev in batch:
                    if ev["type"] == "token":
                        text.append(ev["text"])
                    elif ev["type"] == "attempt_start" and ev["round"] + ev["candidate"] > 0:
                        text.append(f"\n--- round {ev['round']}, candidate {ev['candidate']} ---\n")
                    elif ev["type"] == "attempt":
                        lines.append(to_xml(AttemptLine(ev["attempt"])))
                n += len(batch)
                if text:
                    yield sse_event("token", escape("".join(text)), n)
                if lines:
                    yield sse_event("attempt", "".join(lines), n)
        try:
            m = S.store.get_message(id)
            final = to_xml(Cell(m))
            code_id = (m.get("reply_meta") or {}).get("code_message_id") if m["type"] == "prompt" else None
            if code_id and S.hub.get(f"loop-{id}") is live:
                try:
                    final += to_xml(Cell(S.store.get_message(code_id)))
                except StoreError:
                    pass
        except StoreError as e:
            final = to_xml(Div(str(e), id=f"cell-{id}"))
        yield sse_event("done", final, n + 1)

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


@rt("/traces/{id}")
def get(id: str):
    try:
        t = S.traces.get_trace(id)
    except StoreError as e:
        return HTMLResponse(f"<!doctype html><title>Loopbook</title><p>{escape(str(e))}</p>", status_code=e.status)
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
            Div(" · ".join(x for x in (f"TTFT {a['ttft_s']:.2f} s" if a.get("ttft_s") is not None else "",
                                       f"{a['tokens_per_s']:.1f} tok/s" if a.get("tokens_per_s") else "",
                                       f"ran {a['exec_s']:.3f} s" if a.get("exec_s") else "") if x), cls="figures"),
            cls="round")

    return (Title(f"Trace {t['id']} · Loopbook"),
            Main(A("← back", href=back), H1(f"Trace {t['id']}: {t['kind']} {t['status']} ({t.get('stop_reason') or ''})"),
                 P(f"{t.get('model')} via {t.get('backend')} · {t['n_attempts']} attempts · started {t['created_at']}"),
                 *[Round(a) for a in t["attempts"]], cls="trace-page"))


@rt("/model-badge")
def get():
    return ModelBadge()


@rt("/ansi.css")
def get():
    return Response(ansi_css(), media_type="text/css")


# -- entry point -------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> None:
    import uvicorn

    cfg = parse_config(argv)
    S.cfg = cfg
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
    token = resolve_token(cfg, data_dir)
    cfg.token = token
    shown = "[::1]" if cfg.host == "::1" else cfg.host
    print(f"Loopbook: data in {data_dir}", flush=True)
    print(f"Loopbook is running at http://{shown}:{cfg.port}/?token={token}", flush=True)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning", timeout_graceful_shutdown=5)


if __name__ == "__main__":
    main()
