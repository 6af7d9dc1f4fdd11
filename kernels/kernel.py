"""One ipykernel process driven through jupyter_client's async API: start, run a cell, stop."""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from queue import Empty
from typing import Any

import zmq.asyncio
from jupyter_client import AsyncKernelManager
from jupyter_client.kernelspec import KernelSpec

from .capture import OutputCapture, capped_error
from .live import LiveOutputs
from .result import (
    ABORTED_MESSAGE,
    INTERRUPTED_MESSAGE,
    ExecResult,
    died_message,
    exit_description,
    timeout_message,
)

log = logging.getLogger(__name__)

OnOutput = Callable[[dict[str, Any]], "Awaitable[None] | None"]

ALIVE_POLL_S = 0.25  # how often a waiting execute checks that the process still lives
REPLY_WAIT_S = 5.0  # how long to wait for execute_reply once iopub said idle
DRAIN_S = 0.2  # how long to collect outputs a dead kernel sent before it died
SETTLE_S = 1.0  # how long iopub may stay quiet after execute_reply before "idle" counts as lost


class KernelStartError(RuntimeError):
    """The kernel process did not start or did not answer."""


class _SpecKernelManager(AsyncKernelManager):
    """An AsyncKernelManager whose kernel spec is the argv we give it, not one found on disk."""

    def __init__(self, *, argv: list[str], **kwargs: Any):
        self._loopbook_spec = KernelSpec(argv=argv, display_name="Loopbook Python", language="python")
        super().__init__(**kwargs)

    @property
    def kernel_spec(self) -> KernelSpec:  # type: ignore[override]
        return self._loopbook_spec


class Kernel:
    """A single kernel process with its client; not safe for concurrent executes (the pool serialises)."""

    def __init__(
        self,
        *,
        argv: list[str],
        runtime_dir: Path,
        context: zmq.asyncio.Context,
        env: dict[str, str],
        cwd: str | None = None,
        from_spare: bool = False,
    ):
        self.name = f"k-{uuid.uuid4().hex[:12]}"
        self.argv = argv
        self.runtime_dir = runtime_dir
        self.connection_file = str(runtime_dir / f"{self.name}.json")
        self.log_file = runtime_dir / f"{self.name}.log"
        self.context = context
        self.env = env
        self.cwd = cwd
        self.from_spare = from_spare
        self.km: _SpecKernelManager | None = None
        self.client: Any = None
        self.pid: int | None = None
        self.pgid: int | None = None
        self.started_at: float | None = None
        self.start_s: float | None = None
        self.exit_code: int | None = None
        self.stopping: str | None = None  # why we are stopping it on purpose: "restart", "shutdown", "timeout"
        self.closed = False
        self._executing = False
        self._proc: subprocess.Popen | None = None
        self._side: Any = None  # a second client for shell requests that must not touch execute's replies
        self._side_lock = asyncio.Lock()

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self, timeout: float = 60.0) -> None:
        t0 = time.monotonic()
        self.km = _SpecKernelManager(
            argv=self.argv,
            transport="ipc",
            connection_file=self.connection_file,
            context=self.context,
            shutdown_wait_time=2.0,
        )
        try:
            with open(os.open(self.log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab") as log_fh:
                # fd-level output is echoed by ipykernel to the kernel's own stdout: send that nowhere.
                await self.km.start_kernel(
                    env=self.env, cwd=self.cwd, stdout=subprocess.DEVNULL, stderr=log_fh
                )
            self._proc = getattr(self.km.provisioner, "process", None)
            self.pid = getattr(self.km.provisioner, "pid", None)
            self.pgid = getattr(self.km.provisioner, "pgid", None)
            self.client = self.km.client()
            self.client.start_channels()
            await self.client.wait_for_ready(timeout=timeout)
        except BaseException as exc:
            detail = self.log_tail()
            await self.kill()
            if isinstance(exc, (asyncio.CancelledError, KeyboardInterrupt)):
                raise
            code = f" ({exit_description(self.exit_code)})" if self.exit_code is not None else ""
            raise KernelStartError(
                f"The kernel did not start{code}: {exc}. Command: {' '.join(self.argv[:3])} ..."
                + (f"\nKernel log:\n{detail}" if detail else "")
                + "\nCheck that ipykernel is installed for that Python and that any memory limit leaves room "
                "for the kernel itself (a few hundred MB)."
            ) from (exc if isinstance(exc, Exception) else None)
        self.started_at = time.time()
        self.start_s = time.monotonic() - t0

    def poll(self) -> int | None:
        """The exit code once the process has ended, else None; cheap and synchronous."""
        if self.exit_code is not None or self._proc is None:
            return self.exit_code
        code = self._proc.poll()
        if code is not None:
            self.exit_code = code
        return code

    def alive(self) -> bool:
        return self._proc is not None and self.poll() is None

    def log_tail(self, chars: int = 2000) -> str:
        try:
            with open(self.log_file, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(fh.tell() - chars, 0))
                return fh.read().decode(errors="replace").strip()
        except OSError:
            return ""

    async def interrupt(self) -> None:
        if self.alive() and self.km is not None:
            try:
                await self.km.interrupt_kernel()
            except (RuntimeError, OSError) as exc:
                log.debug("interrupt of %s failed: %s", self.name, exc)

    async def kill(self) -> None:
        """Stop the process group at once and remove its files."""
        await self._stop(now=True)

    async def shutdown(self) -> None:
        """Ask the kernel to exit (it may run its atexit hooks), killing it after 2 s."""
        await self._stop(now=not self.alive())

    async def _stop(self, *, now: bool) -> None:
        if self.closed:
            return
        self.closed = True
        # Closing sockets under a waiting execute would cancel it; it closes them itself when done.
        if self.client is not None and not self._executing:
            self.client.stop_channels()
        if self._side is not None and not self._side_lock.locked():
            self._side.stop_channels()
        if self.km is not None:
            try:
                await self.km.shutdown_kernel(now=now)
            except Exception as exc:  # the process may be gone already; make sure of it
                log.debug("shutdown of %s: %s", self.name, exc)
                self.kill_now()
            self.poll()
        # Processes the cell started share the kernel's process group: do not leave them behind.
        self.kill_group()
        for path in (Path(self.connection_file), self.log_file):
            path.unlink(missing_ok=True)

    def kill_group(self) -> None:
        """SIGKILL whatever is left in the kernel's process group (it is its own session)."""
        if self.pgid and self.pgid != os.getpgrp():  # never our own group
            try:
                os.killpg(self.pgid, signal.SIGKILL)
            except OSError:
                pass

    def kill_now(self) -> None:
        """Synchronous last resort (atexit): SIGKILL the kernel and its process group."""
        if self.closed:  # already stopped; its group id may belong to someone else by now
            return
        if self.pid and self.alive():
            try:
                os.kill(self.pid, signal.SIGKILL)
            except OSError:
                pass
        self.kill_group()

    # -- shell requests besides execute ---------------------------------------------------------

    @property
    def executing(self) -> bool:
        """True while an execute runs: the kernel answers other shell requests only after it."""
        return self._executing

    async def request(self, msg_type: str, content: dict[str, Any], timeout: float) -> dict[str, Any] | None:
        """Send one shell request (complete, inspect, ...) on a side channel; its reply, or None on timeout.

        The side channel has its own socket, so execute never reads (and drops) these replies, and a
        reply that comes after its timeout is dropped by the next request.
        """
        end = time.monotonic() + timeout
        await self._side_lock.acquire()  # held at most one request's timeout
        try:
            if self.closed or not self.alive() or time.monotonic() >= end:
                return None
            if self._side is None:
                # Its own session id: the socket identity. The kernel's shell socket hands an identity
                # over to the newest connection, so sharing execute's would steal execute's replies.
                session = self.km.session.clone()
                session.session = str(uuid.uuid4())
                self._side = self.km.client(session=session)
                self._side.start_channels(shell=True, iopub=False, stdin=False, hb=False, control=False)
            msg = self._side.session.msg(msg_type, content)
            self._side.shell_channel.send(msg)
            msg_id = msg["header"]["msg_id"]
            while (left := end - time.monotonic()) > 0:
                try:
                    reply = await self._side.get_shell_msg(timeout=min(left, ALIVE_POLL_S))
                except Empty:
                    if not self.alive():
                        return None
                    continue
                if reply["parent_header"].get("msg_id") == msg_id:
                    return reply["content"]
            return None
        finally:
            self._side_lock.release()
            if self.closed and self._side is not None:
                self._side.stop_channels()

    # -- running code ---------------------------------------------------------------------------

    async def execute(
        self,
        code: str,
        *,
        timeout: float | None,
        on_output: OnOutput | None = None,
        live: LiveOutputs | None = None,
        silent: bool = False,
        store_history: bool = True,
        user_expressions: dict[str, str] | None = None,
        cap_chars: int = 200_000,
        display_cap_chars: int = 5_000_000,
        interrupt_grace_s: float = 5.0,
    ) -> ExecResult:
        """Run one cell; never raises for what the code does (errors, hangs, crashes are statuses).

        `live` gets batches of output events while it runs, the last one before this returns.
        """
        self._executing = True
        try:
            result = await self._execute(
                code,
                timeout=timeout,
                on_output=on_output,
                live=live,
                silent=silent,
                store_history=store_history,
                user_expressions=user_expressions,
                cap_chars=cap_chars,
                display_cap_chars=display_cap_chars,
                interrupt_grace_s=interrupt_grace_s,
            )
        finally:
            self._executing = False
            if self.closed and self.client is not None:
                self.client.stop_channels()
        if live is not None:
            await live.close(result.outputs)
        return result

    async def _execute(
        self,
        code: str,
        *,
        timeout: float | None,
        on_output: OnOutput | None,
        live: LiveOutputs | None,
        silent: bool,
        store_history: bool,
        user_expressions: dict[str, str] | None,
        cap_chars: int,
        display_cap_chars: int,
        interrupt_grace_s: float,
    ) -> ExecResult:
        t0 = time.monotonic()
        capture = OutputCapture(cap_chars, display_cap_chars)
        if not self.alive():
            return self._died(capture, t0)
        msg_id = self.client.execute(
            code,
            silent=silent,
            store_history=store_history and not silent,
            user_expressions=user_expressions,
            allow_stdin=False,
        )
        limit = math.inf if timeout is None else timeout
        deadline = t0 + limit
        interrupted_at: float | None = None
        next_alive_check = t0 + ALIVE_POLL_S
        reply: dict[str, Any] | None = None
        settle_until = math.inf
        try:
            while True:
                now = time.monotonic()
                wait = min(ALIVE_POLL_S, max(next_alive_check - now, 0.0))
                if interrupted_at is None:
                    wait = min(wait, max(deadline - now, 0.0))
                if live is not None:
                    wait = min(wait, max(live.due() - now, 0.0))
                try:
                    msg = await self.client.get_iopub_msg(timeout=wait)
                except Empty:
                    msg = None
                if msg is not None and msg["parent_header"].get("msg_id") == msg_id:
                    if reply is not None:  # still draining a backlog: nothing is lost yet
                        settle_until = time.monotonic() + SETTLE_S
                    msg_type, content = msg["msg_type"], msg["content"]
                    if msg_type == "status":
                        if content.get("execution_state") == "idle":
                            break
                    else:
                        await _deliver(on_output, capture.add(msg_type, content))
                        if live is not None:
                            live.touch()
                now = time.monotonic()
                if live is not None and now >= live.due():
                    await live.flush(capture)
                if now >= next_alive_check:
                    next_alive_check = now + ALIVE_POLL_S
                    if not self.alive():
                        await self._drain(msg_id, capture, on_output)
                        return self._died(capture, t0)
                    if reply is None and (reply := await self._poll_reply(msg_id)) is not None:
                        settle_until = now + SETTLE_S
                if now >= settle_until:
                    # The reply came but "idle" never did: a flood of output overflowed the kernel's
                    # iopub queue, which drops messages. Finish rather than wait for a lost message.
                    capture.note_lost()
                    break
                if reply is not None:
                    continue
                if interrupted_at is None and now >= deadline:
                    interrupted_at = now
                    capture.drop_keyboard_interrupt = True
                    await self.interrupt()
                elif interrupted_at is not None and now >= interrupted_at + interrupt_grace_s:
                    self.stopping = "timeout"
                    await self.kill()
                    return self._timeout_killed(capture, t0, limit)
        except asyncio.CancelledError:
            # Whoever waited is gone: stop the cell so the next one does not queue behind it.
            await asyncio.shield(self.interrupt())
            raise
        if reply is None:
            reply = await self._reply(msg_id)
        result = self._finish(capture, t0, reply, timed_out=interrupted_at is not None, limit=limit)
        result.user_expressions = (reply or {}).get("user_expressions")
        return result

    async def _reply(self, msg_id: str) -> dict[str, Any] | None:
        end = time.monotonic() + REPLY_WAIT_S
        while (left := end - time.monotonic()) > 0:
            try:
                msg = await self.client.get_shell_msg(timeout=min(left, ALIVE_POLL_S))
            except Empty:
                if not self.alive():
                    return None
                continue
            if msg["parent_header"].get("msg_id") == msg_id:
                return msg["content"]
        return None

    async def _poll_reply(self, msg_id: str) -> dict[str, Any] | None:
        """The execute_reply if it is already here; other replies are stale and dropped."""
        while True:
            try:
                msg = await self.client.get_shell_msg(timeout=0)
            except Empty:
                return None
            if msg["parent_header"].get("msg_id") == msg_id:
                return msg["content"]

    async def _drain(self, msg_id: str, capture: OutputCapture, on_output: OnOutput | None) -> None:
        end = time.monotonic() + DRAIN_S
        while (left := end - time.monotonic()) > 0:
            try:
                msg = await self.client.get_iopub_msg(timeout=left)
            except Empty:
                return
            if msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] != "status":
                await _deliver(on_output, capture.add(msg["msg_type"], msg["content"]))

    def _finish(
        self, capture: OutputCapture, t0: float, reply: dict[str, Any] | None, *, timed_out: bool, limit: float
    ) -> ExecResult:
        reply = reply or {}
        count = reply.get("execution_count")
        outputs = capture.finish()
        if timed_out:
            return _result(capture, outputs, t0, "timeout", count, message=timeout_message(limit, kernel_stopped=False))
        error_outputs = [o for o in outputs if o.get("output_type") == "error"]
        status = reply.get("status") or ("error" if error_outputs else "ok")
        if status == "aborted":
            return _result(capture, outputs, t0, "interrupted", count, message=ABORTED_MESSAGE)
        if status != "error":
            return _result(capture, outputs, t0, "ok", count)
        error = capped_error(reply if reply.get("ename") else (error_outputs[-1] if error_outputs else {}))
        if not error_outputs:  # the error output itself was lost on iopub: the reply has it
            outputs.append(dict(error))
        error.pop("output_type", None)
        if error.get("ename") == "KeyboardInterrupt":
            return _result(capture, outputs, t0, "interrupted", count, error=error, message=INTERRUPTED_MESSAGE)
        return _result(capture, outputs, t0, "error", count, error=error)

    def _died(self, capture: OutputCapture, t0: float) -> ExecResult:
        return _result(capture, capture.finish(), t0, "died", message=died_message(self.poll()))

    def _timeout_killed(self, capture: OutputCapture, t0: float, limit: float) -> ExecResult:
        return _result(capture, capture.finish(), t0, "timeout", message=timeout_message(limit, kernel_stopped=True))


def _result(
    capture: OutputCapture,
    outputs: list[dict[str, Any]],
    t0: float,
    status: str,
    count: int | None = None,
    *,
    error: dict[str, Any] | None = None,
    message: str | None = None,
) -> ExecResult:
    return ExecResult(
        status=status,
        outputs=outputs,
        execution_count=count,
        duration_s=time.monotonic() - t0,
        error=error,
        truncated=capture.truncated,
        original_chars=capture.original_chars,
        message=message,
    )


async def _deliver(on_output: OnOutput | None, outputs: list[dict[str, Any]]) -> None:
    if on_output is None:
        return
    for output in outputs:
        try:
            ret = on_output(output)
            if inspect.isawaitable(ret):
                await ret
        except Exception:  # a broken display must not break the run
            log.exception("on_output callback failed; the output is still captured")
