"""Shared test setup: run our folders from the checkout, and gate the slow tests."""

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


@pytest.fixture(scope="module")
def browser():
    """A real headless Chromium (Debian's, through Playwright), one per test module."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
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
