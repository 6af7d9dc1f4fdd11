"""One event loop per test module for a real KernelPool, and a process check."""

from __future__ import annotations

import asyncio
import os
import time

from kernels import KernelPool


class LoopSession:
    """Runs coroutines on one long-lived event loop, so the pool and its background tasks persist."""

    def __init__(self):
        self.runner = asyncio.Runner()

    def run(self, coro, timeout=120):
        return self.runner.run(asyncio.wait_for(coro, timeout))

    def wait_until(self, predicate, timeout=15.0):
        end = time.monotonic() + timeout
        while time.monotonic() < end and not predicate():
            self.run(asyncio.sleep(0.05))
        return predicate()


def pool_session(setup: tuple[str, str] | None = None, **pool_kwargs):
    """A module fixture's body: a started pool on its own loop (kernel `key` runs `code` first), shut down after."""
    session = LoopSession()
    session.pool = KernelPool(**{"spare": False, "interrupt_grace_s": 2.0, **pool_kwargs})
    session.run(session.pool.start())
    if setup is not None:
        res = session.run(session.pool.execute(*setup))
        assert res.status == "ok", res
    yield session
    session.run(session.pool.shutdown_all())
    session.runner.close()


def pid_alive(pid):
    """True while the process exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
