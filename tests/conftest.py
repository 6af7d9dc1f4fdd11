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
