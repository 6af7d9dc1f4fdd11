"""The lock files and pyproject.toml: the digest `./loopbook lock` writes, and the pins a lock holds.

    python -P tests/lockfile.py --digest pyproject.toml
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import tomllib
from pathlib import Path

DIGEST_LINE = re.compile(r"^# pyproject-dependencies-sha256: ([0-9a-f]{64})$", re.M)
PIN = re.compile(r"^([A-Za-z0-9_.\-]+)==([^\s;\\]+)", re.M)


def requirements(pyproject: Path) -> dict[str, list[str]]:
    """The dependency lists a lock is made from: "" for the app's own, then one per extra."""
    project = tomllib.loads(pyproject.read_text())["project"]
    return {"": list(project["dependencies"]), **project.get("optional-dependencies", {})}


def digest(pyproject: Path) -> str:
    return hashlib.sha256(json.dumps(requirements(pyproject), sort_keys=True).encode()).hexdigest()


def recorded_digest(lock: Path) -> str | None:
    m = DIGEST_LINE.search(lock.read_text())
    return m.group(1) if m else None


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(lock: Path) -> dict[str, str]:
    """{canonical name: version} of every `name==version` line."""
    return {canonical(n): v for n, v in PIN.findall(lock.read_text())}


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "--digest":
        sys.exit("usage: python -P tests/lockfile.py --digest pyproject.toml")
    print(digest(Path(sys.argv[2])))
