"""Shared parts of the browser tests: a real Chromium (Debian's, through Playwright), a page that must
stay on 127.0.0.1 and log no errors, and screenshots into test-artifacts/."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlsplit

from apphelpers import Server, wait_for_model
from parts import chromium_path, require, require_module

ROOT = Path(__file__).resolve().parent.parent
# `chromium` on PATH (Debian's, as ./loopbook installs it) or $LOOPBOOK_CHROMIUM; None when there is none, and
# then require("chromium") skips the browser tests (a failure under CI).
CHROMIUM = chromium_path()
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]
VIEWPORT = {"width": 1280, "height": 860}


def launch(playwright):
    """Headless Chromium with no sandbox and no background traffic; each context is a fresh profile."""
    return playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)


class Watched:
    """A page whose every request must go to 127.0.0.1 and whose console must stay free of errors."""

    def __init__(self, context, allow_errors: tuple[str, ...] = ()):
        self.page = context.new_page()
        self.outside: list[str] = []
        self.errors: list[str] = []
        self.allow = [re.compile(p) for p in allow_errors]
        self.page.route("**/*", self._only_loopback)
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda err: self.errors.append(f"pageerror: {err}"))

    def _only_loopback(self, route):
        url = route.request.url
        if urlsplit(url).hostname == "127.0.0.1":
            route.continue_()
        else:
            self.outside.append(url)
            route.abort()

    def _console(self, msg):
        if msg.type == "error" and not any(p.search(msg.text) for p in self.allow):
            self.errors.append(msg.text)

    def check(self) -> None:
        assert not self.outside, f"the page tried to leave 127.0.0.1: {self.outside}"
        assert not self.errors, f"console errors (CSP violations included): {self.errors}"


def shot(page, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path))
    return path


def until(page, expression: str, timeout: float = 30.0, interval: float = 0.1):
    """Poll a JavaScript expression until it is truthy. (Playwright's wait_for_function polls with eval,
    which the page's CSP refuses, and the tests must not switch the CSP off.)"""
    import time

    deadline = time.monotonic() + timeout
    while True:
        value = page.evaluate(expression)
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"still false after {timeout} s: {expression}")
        page.wait_for_timeout(interval * 1000)


def playwright_api():
    """Playwright's sync API, once Chromium and Playwright are known to be here (else a skip; under CI a failure)."""
    require("chromium")
    return require_module("playwright.sync_api")


def model_server(tmp_path_factory, name: str, *flags: str):
    """A test module's app server on the real SmolLM2 model, waited for, stopped afterwards (a fixture's body)."""
    s = Server(tmp_path_factory.mktemp(name), "--model", "smollm2-135m", *flags).start()
    with s.client() as c:
        wait_for_model(c)
    yield s
    s.stop()
