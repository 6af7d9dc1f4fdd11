"""The lock files are in step with pyproject.toml: what a fresh machine installs is what the suite ran on."""

from __future__ import annotations

from pathlib import Path

import pytest
from packaging.requirements import Requirement

from lockfile import canonical, digest, pins, recorded_digest, requirements

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = ROOT / "pyproject.toml"
LOCKS = {"all": ROOT / "requirements-all.lock", "app": ROOT / "requirements-app.lock"}
REFRESH = "pyproject.toml changed since the lock was made: run `./loopbook lock` and commit requirements-*.lock"


@pytest.mark.parametrize("kind", sorted(LOCKS))
def test_the_lock_was_made_from_this_pyproject(kind):
    assert recorded_digest(LOCKS[kind]) == digest(PYPROJECT), REFRESH


def _check_pinned(lock: Path, groups: list[str]) -> None:
    pinned = pins(lock)
    for group in groups:
        for line in requirements(PYPROJECT)[group]:
            req = Requirement(line)
            name = canonical(req.name)
            assert name in pinned, f"{req.name} (from [{group or 'dependencies'}]) is not in {lock.name}: {REFRESH}"
            assert req.specifier.contains(pinned[name], prereleases=True), \
                f"{lock.name} pins {req.name}=={pinned[name]}, outside {req.specifier}: {REFRESH}"


def test_every_requirement_of_every_extra_is_pinned_within_its_range():
    _check_pinned(LOCKS["all"], list(requirements(PYPROJECT)))


def test_the_app_lock_is_the_runtime_subset_of_the_full_one():
    _check_pinned(LOCKS["app"], [""])
    app, full = pins(LOCKS["app"]), pins(LOCKS["all"])
    assert {n: v for n, v in app.items() if full.get(n) != v} == {}
    assert "torch" not in app and "pytest" not in app  # extras stay out of the app's install


@pytest.mark.parametrize("kind", sorted(LOCKS))
def test_every_pin_carries_a_hash(kind):
    text = LOCKS[kind].read_text()
    entries = [e for e in text.split("\n") if e and not e.startswith((" ", "#"))]
    assert entries and all(e.endswith("\\") for e in entries), "pip-compile --generate-hashes writes a hash per pin"
    assert text.count("--hash=sha256:") >= len(entries)
