"""Start the real Loopbook server in a subprocess for integration tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "test-token-123"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_model(client: httpx.Client, timeout: float = 60.0) -> None:
    """Until the server's model is no longer loading (ready, or failed: the tests say which they need)."""
    deadline = time.time() + timeout
    while time.time() < deadline and client.get("/api/model").json()["state"] == "loading":
        time.sleep(0.1)


class Server:
    """A running `python app.py` with its own data dir, driven over real HTTP."""

    def __init__(self, data_dir: Path, *args: str, env: dict | None = None):
        self.data_dir = Path(data_dir)
        self.args = list(args)
        self.env = env or {}
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log = self.data_dir / "server.log"

    def start(self, timeout: float = 60.0) -> "Server":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "LOOPBOOK_TOKEN": TOKEN, **self.env}
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "app.py"), "--port", str(self.port), "--data-dir", str(self.data_dir),
             *self.args],
            cwd=ROOT, env=env, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.base + "/api/dialogs", headers=self.headers, timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server did not answer in {timeout}s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    @property
    def headers(self) -> dict:
        return {"Authorization": f"token {TOKEN}"}

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.base, headers=self.headers, timeout=kw.pop("timeout", 60), **kw)
