"""Shared test setup: run our folders from the checkout, gate the slow tests, and fail (not skip) under CI
when a part the test command installs is missing (see parts.py)."""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def pytest_collection_modifyitems(config, items):
    # Slow tests (the 1.1 GB coder model, long evals) run only when asked for.
    if os.environ.get("LOOPBOOK_SLOW") == "1" or "slow" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="slow: set LOOPBOOK_SLOW=1 or pass -m slow to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def _skip_reason(report) -> str | None:
    if report.skipped and isinstance(report.longrepr, tuple) and len(report.longrepr) == 3:
        return str(report.longrepr[2])
    return None


def _fail_missing_part(report) -> None:
    """Under CI=true/1, a skip because an installed part is missing becomes a failure that says so."""
    from parts import ci, ci_failure, missing_part

    reason = _skip_reason(report)
    if reason is None or not ci() or getattr(report, "wasxfail", None) is not None:
        return
    part = missing_part(reason)
    if part is not None:
        report.outcome = "failed"
        report.longrepr = ci_failure(part, reason)


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    report = yield  # a module-level skip (require("chromium"), importorskip at the top) lands here
    _fail_missing_part(report)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield  # a skip in a fixture (setup) or in the test body (call)
    _fail_missing_part(report)
    return report


@pytest.fixture
def store(tmp_path):
    from dialog import Store

    s = Store(tmp_path / "data")
    yield s
    s.close()


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """One real Loopbook server (no model needed) shared by the API tests."""
    from apphelpers import Server

    s = Server(tmp_path_factory.mktemp("api"), "--exec-timeout", "4", "--output-cap", "20000",
               "--model", "/no/model/for/these/tests.gguf").start()
    yield s
    s.stop()


@pytest.fixture
def c(server):
    with server.client() as client:
        yield client


@pytest.fixture(scope="session")
def app_client(tmp_path_factory):
    """The app in this process (create_app under Starlette's TestClient, which runs its lifespan: real store, real
    kernels, no model), for the tests that need no server of their own; its state is `app_client.app.state`."""
    from starlette.testclient import TestClient

    from apphelpers import TOKEN
    from securityhelpers import app_module

    app = app_module()
    cfg = app.Config(data_dir=str(tmp_path_factory.mktemp("inproc")), token=TOKEN, exec_timeout=4, output_cap=20000,
                     model="/no/model/for/these/tests.gguf")
    with TestClient(app.create_app(cfg), base_url="http://127.0.0.1",
                    headers={"Authorization": f"token {TOKEN}"}) as client:
        yield client


@pytest.fixture(scope="module")
def browser():
    """A real headless Chromium (Debian's, through Playwright), one per test module."""
    from parts import require, require_module

    require("chromium")
    sync_api = require_module("playwright.sync_api")
    from browserhelpers import launch

    with sync_api.sync_playwright() as playwright:
        b = launch(playwright)
        yield b
        b.close()


@pytest.fixture(scope="session")
def model_server(tmp_path_factory):
    """A real server with the real SmolLM2-135M GGUF loaded, shared by the model tests."""
    from apphelpers import Server, wait_for_model

    s = Server(tmp_path_factory.mktemp("model"), "--model", "smollm2-135m", "--max-tokens", "32",
               "--exec-timeout", "10").start()
    with s.client() as c:
        wait_for_model(c)
    yield s
    s.stop()


@pytest.fixture
def watched(browser, server):
    """A page of the test module's app server (its `server` fixture), logged in, in a fresh browser context; an
    error on the page fails the test."""
    from apphelpers import TOKEN
    from browserhelpers import VIEWPORT, Watched

    context = browser.new_context(viewport=VIEWPORT, accept_downloads=True)
    w = Watched(context)
    w.page.set_default_timeout(20_000)
    w.page.goto(f"{server.base}/?token={TOKEN}")
    yield w
    context.close()
    w.check()


@pytest.fixture
def api(server):
    """An API client of the test module's app server (its `server` fixture)."""
    with server.client() as c:
        yield c
