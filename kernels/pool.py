"""KernelPool: one kernel per key (a dialog id), a warm spare, death recovery, culling and cleanup."""

from __future__ import annotations

import asyncio
import atexit
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq.asyncio

from . import introspect, namespace
from .introspect import Completion, Inspection
from .kernel import Kernel, KernelStartError, OnOutput
from .launch import check_resource_limits, kernel_argv, make_runtime_dir
from .live import INTERVAL_S, TAIL_CHARS, LiveOutputs, OnBatch
from .namespace import ToolResult, ToolSpec, VariableNote
from .result import RESTARTED_MESSAGE, SHUTDOWN_MESSAGE, ExecResult

log = logging.getLogger(__name__)

REFILL_DELAY_S = 0.25  # let the first run in a new key go before the spare's refill takes the CPU
OUTPUT_FLUSH_S = 0.02  # how long a kernel holds printed text before sending it (ipykernel's default: 0.2 s)
SETUP_TIMEOUT_S = 30.0
STATES = ("none", "starting", "idle", "busy", "dead", "restarting")


class KernelInitError(RuntimeError):
    """A key's init_code (or its cwd/env setup) failed; `result` holds what it produced."""

    def __init__(self, message: str, result: ExecResult):
        super().__init__(message)
        self.result = result


@dataclass
class _Slot:
    key: str
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    cwd: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    init_code: str | None = None
    kernel: Kernel | None = None
    phase: str | None = None  # "starting" or "restarting" while a kernel is being assigned
    busy: bool = False
    executions: int = 0
    kernels_assigned: int = 0
    last_used: float | None = None  # wall clock, for people
    idle_since: float = 0.0  # monotonic, for culling
    init_pending: bool = False
    applied_cwd: str | None = None
    applied_env: dict[str, str] = field(default_factory=dict)


class KernelPool:
    """One ipykernel per key over IPC, through jupyter_client's async API.

    Executes on one key are serialised; different keys run in parallel. A warm spare makes the first
    run in a new key fast. Call `start()` at app start and `shutdown_all()` at exit (an atexit hook
    kills whatever is left). `execute(on_batch=...)` streams a cell's outputs live (kernels.live);
    `complete`, `inspect`, `variables`, `tool_specs` and `call_tool` ask the key's kernel for
    completions, help, value summaries and tool calls (kernels.introspect, kernels.namespace).
    """

    def __init__(
        self,
        output_cap_chars: int = 200_000,
        spare: bool = True,
        runtime_dir: str | os.PathLike | None = None,
        default_timeout: float | None = 60.0,
        cull_idle_s: float | None = None,
        resource_limits: dict[str, int] | None = None,
        python: str = sys.executable,
        env: dict[str, str] | None = None,
        *,
        display_cap_chars: int = 5_000_000,
        start_timeout: float = 60.0,
        interrupt_grace_s: float = 5.0,
        live_interval_s: float = INTERVAL_S,
        live_tail_chars: int = TAIL_CHARS,
        output_flush_s: float | None = OUTPUT_FLUSH_S,
    ):
        if output_cap_chars < 2:
            raise ValueError(f"output_cap_chars must be at least 2, got {output_cap_chars!r}")
        _check_timeout(default_timeout, "default_timeout", allow_none=True)
        if cull_idle_s is not None and not cull_idle_s > 0:
            raise ValueError(f"cull_idle_s must be a positive number of seconds or None, got {cull_idle_s!r}")
        self.output_cap_chars = output_cap_chars
        self.display_cap_chars = display_cap_chars
        self.spare = spare
        self.default_timeout = default_timeout
        self.cull_idle_s = cull_idle_s
        self.resource_limits = check_resource_limits(resource_limits)
        self.python = python
        self.env = _check_env(env, "env")
        self.start_timeout = start_timeout
        self.interrupt_grace_s = interrupt_grace_s
        self.live_interval_s = live_interval_s
        self.live_tail_chars = live_tail_chars
        _check_timeout(output_flush_s, "output_flush_s", allow_none=True)
        self.output_flush_s = output_flush_s
        self._argv = kernel_argv(python, self.resource_limits, output_flush_s)
        self._runtime_arg = runtime_dir
        self._runtime_dir: Path | None = None
        self._runtime_created = False
        self._context: zmq.asyncio.Context | None = None
        self._slots: dict[str, _Slot] = {}
        self._kernels: set[Kernel] = set()  # every process we own, spare and half-started included
        self._spare_task: asyncio.Task[Kernel] | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._started = False

    # -- public API -----------------------------------------------------------------------------

    async def start(self, wait: bool = True) -> None:
        """Start the background watcher and the warm spare; with wait, until the spare answers."""
        if not self._started:
            self._started = True
            self._watch_task = asyncio.create_task(self._watch(), name="loopbook-kernel-watch")
            if self.spare:
                self._fill_spare(delay=0.0)
        if wait and self._spare_task is not None:
            task = self._spare_task
            try:
                await asyncio.shield(task)
            except KernelStartError:
                if self._spare_task is task:
                    self._spare_task = None
                raise

    async def ensure(
        self,
        key: str,
        cwd: str | os.PathLike | None = None,
        env: dict[str, str] | None = None,
        init_code: str | None = None,
    ) -> None:
        """Give `key` a live kernel (the warm spare when there is one). None keeps earlier settings.

        Raises KernelStartError when no kernel can start and KernelInitError when init_code fails.
        """
        slot = self._slot(key)
        self._configure(slot, cwd, env, init_code)
        async with slot.lock:
            await self._ensure_locked(slot)

    async def execute(
        self,
        key: str,
        code: str,
        timeout: float | None = None,
        on_output: OnOutput | None = None,
        silent: bool = False,
        store_history: bool = True,
        *,
        on_batch: OnBatch | None = None,
        user_expressions: dict[str, str] | None = None,
    ) -> ExecResult:
        """Run `code` in the key's kernel (started or replaced as needed) and capture its outputs.

        on_batch(events) is the live view (sync or async, see kernels.live): batches of nbformat-shaped
        events, folded and coalesced, at most one per `live_interval_s`; the last one, sent before this
        returns, leaves the consumer's copy equal to the result's outputs. It is awaited between reads
        of the kernel's output, so it should be quick (hand the batch to a queue or an SSE log).

        on_output(output) is the older raw hook: each output as it is captured (complete lines only),
        plus {"output_type": "clear_output"} and {"output_type": "update_display_data", ...} events;
        once a cell's text passes the head half of the cap, one notice and then nothing until the end.

        user_expressions are evaluated by the kernel after the code; their results are in the result's
        `user_expressions` (Jupyter's mime-bundle form).
        """
        if not isinstance(code, str):
            raise TypeError(f"code must be a str, got {type(code).__name__}")
        limit = self.default_timeout if timeout is None else timeout
        _check_timeout(limit, "timeout", allow_none=True)
        slot = self._slot(key)
        live = None
        if on_batch is not None:
            live = LiveOutputs(on_batch, interval_s=self.live_interval_s, tail_chars=self.live_tail_chars)
        async with slot.lock:
            try:
                kernel = await self._ensure_locked(slot)
            except KernelInitError as exc:
                if live is not None:
                    await live.close(exc.result.outputs)
                return exc.result
            slot.busy = True
            try:
                result = await kernel.execute(
                    code,
                    timeout=limit,
                    on_output=on_output,
                    live=live,
                    silent=silent,
                    store_history=store_history,
                    user_expressions=user_expressions,
                    cap_chars=self.output_cap_chars,
                    display_cap_chars=self.display_cap_chars,
                    interrupt_grace_s=self.interrupt_grace_s,
                )
            finally:
                slot.busy = False
                slot.last_used, slot.idle_since = time.time(), time.monotonic()
            slot.executions += 1
            if kernel.stopping in ("restart", "shutdown") and result.status in ("died", "timeout", "interrupted"):
                result.status = "interrupted"
                result.message = RESTARTED_MESSAGE if kernel.stopping == "restart" else SHUTDOWN_MESSAGE
            if not kernel.alive():
                await self._retire(kernel)
            return result

    # -- asking the kernel (kernels.introspect, kernels.namespace) ------------------------------

    async def complete(
        self, key: str, code: str, cursor_pos: int | None = None, *, timeout: float = introspect.TIMEOUT_S
    ) -> Completion:
        """Completions at cursor_pos from the key's kernel; status "busy" at once while a cell runs.

        Never starts a kernel or waits behind a cell (see kernels.introspect).
        """
        slot = self._slots.get(_check_key(key))
        return await introspect.complete(slot.kernel if slot else None, self.state(key), code, cursor_pos, timeout)

    async def inspect(
        self,
        key: str,
        code: str,
        cursor_pos: int | None = None,
        detail_level: int = 0,
        *,
        timeout: float = introspect.TIMEOUT_S,
    ) -> Inspection:
        """Help (signature, docstring) for the name at cursor_pos; status "busy" at once while a cell runs."""
        slot = self._slots.get(_check_key(key))
        kernel = slot.kernel if slot else None
        return await introspect.inspect(kernel, self.state(key), code, cursor_pos, detail_level, timeout)

    async def variables(
        self, key: str, names: list[str], *, timeout_per_name: float = 2.0, max_chars: int = 2_000
    ) -> list[VariableNote]:
        """A trimmed summary of each name's value for a prompt (runs after any cell already running)."""
        return await namespace.variables(self, key, names, timeout_per_name=timeout_per_name, max_chars=max_chars)

    async def tool_specs(self, key: str, names: list[str], *, max_chars: int = 2_000) -> list[ToolSpec]:
        """A JSON-schema tool description of each named kernel function."""
        return await namespace.tool_specs(self, key, names, max_chars=max_chars)

    async def call_tool(
        self, key: str, name: str, arguments: dict[str, Any] | str, *, timeout: float = 30.0, max_chars: int = 4_000
    ) -> ToolResult:
        """Call a kernel function with JSON arguments; its trimmed result, or the error as text."""
        return await namespace.call_tool(self, key, name, arguments, timeout=timeout, max_chars=max_chars)

    async def interrupt(self, key: str) -> bool:
        """Send SIGINT to the key's kernel; True when there was a live kernel to interrupt."""
        slot = self._slots.get(_check_key(key))
        kernel = slot.kernel if slot else None
        if kernel is None or not kernel.alive():
            return False
        await kernel.interrupt()
        return True

    async def restart(self, key: str) -> None:
        """Replace the key's kernel with a fresh one (variables are lost; cwd, env and init_code re-apply)."""
        slot = self._slot(key)
        slot.phase = "restarting"
        try:
            running = slot.kernel
            if running is not None and slot.busy:
                running.stopping = "restart"
                await running.kill()  # the waiting execute sees the death and reports "interrupted"
            async with slot.lock:
                old, slot.kernel = slot.kernel, None
                if old is not None:
                    old.stopping = old.stopping or "restart"
                    self._in_background(self._retire(old, polite=True))
                await self._ensure_locked(slot, phase="restarting")
        finally:
            slot.phase = None

    async def shutdown(self, key: str) -> None:
        """Stop the key's kernel; its settings stay, so a later execute starts a new one."""
        slot = self._slots.get(_check_key(key))
        if slot is None:
            return
        running = slot.kernel
        if running is not None and slot.busy:
            running.stopping = "shutdown"
            await running.kill()
        async with slot.lock:
            old, slot.kernel = slot.kernel, None
            if old is not None:
                old.stopping = old.stopping or "shutdown"
                await self._retire(old, polite=True)

    async def shutdown_all(self) -> None:
        """Stop every kernel, the spare included, and remove the runtime folder."""
        self._started = False
        tasks = [t for t in (self._watch_task, self._spare_task) if t is not None]
        self._watch_task = self._spare_task = None
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for slot in self._slots.values():
            if slot.kernel is not None:
                slot.kernel.stopping = slot.kernel.stopping or "shutdown"
            slot.kernel = None
        kernels = list(self._kernels)
        await asyncio.gather(*(self._retire(k, polite=True) for k in kernels), return_exceptions=True)
        await asyncio.gather(*list(self._background), return_exceptions=True)
        self._remove_runtime_dir()
        # Executes that were running see their kernel gone within a poll; let them report before
        # the sockets they wait on disappear with the context.
        end = time.monotonic() + 3.0
        while any(slot.busy for slot in self._slots.values()) and time.monotonic() < end:
            await asyncio.sleep(0.05)
        if self._context is not None and not any(slot.busy for slot in self._slots.values()):
            self._context.destroy(linger=0)
            self._context = None

    def state(self, key: str) -> str:
        """One of "none", "starting", "idle", "busy", "dead", "restarting"."""
        slot = self._slots.get(_check_key(key))
        if slot is None:
            return "none"
        if slot.phase:
            return slot.phase
        kernel = slot.kernel
        if kernel is None:
            return "none"
        if not kernel.alive():
            return "dead"
        return "busy" if slot.busy else "idle"

    def info(self, key: str) -> dict[str, Any]:
        """What the pool knows about the key's kernel: pid, transport, times, counts, origin."""
        slot = self._slots.get(_check_key(key))
        kernel = slot.kernel if slot else None
        return {
            "key": key,
            "state": self.state(key),
            "pid": kernel.pid if kernel else None,
            "transport": "ipc" if kernel else None,
            "connection_file": kernel.connection_file if kernel and not kernel.closed else None,
            "started_at": kernel.started_at if kernel else None,
            "start_s": kernel.start_s if kernel else None,
            "from_spare": kernel.from_spare if kernel else None,
            "exit_code": kernel.poll() if kernel else None,
            "executions": slot.executions if slot else 0,
            "last_used": slot.last_used if slot else None,
            "kernels_assigned": slot.kernels_assigned if slot else 0,
            "cwd": slot.cwd if slot else None,
            "resource_limits": dict(self.resource_limits) if self.resource_limits else None,
        }

    def keys(self) -> list[str]:
        """Keys that currently have a kernel (live or dead)."""
        return [k for k, s in self._slots.items() if s.kernel is not None]

    def pids(self) -> list[int]:
        """Process ids of every kernel the pool owns, the spare included."""
        return sorted(k.pid for k in self._kernels if k.pid is not None and k.alive())

    # -- assigning kernels ----------------------------------------------------------------------

    def _slot(self, key: str) -> _Slot:
        key = _check_key(key)
        slot = self._slots.get(key)
        if slot is None:
            slot = self._slots[key] = _Slot(key)
        return slot

    def _configure(self, slot: _Slot, cwd: Any, env: dict[str, str] | None, init_code: str | None) -> None:
        if cwd is not None:
            path = Path(cwd).expanduser()
            if not path.is_dir():
                raise ValueError(f"cwd {str(cwd)!r} is not an existing folder; create it first or pass None")
            slot.cwd = str(path.resolve())
        if env is not None:
            slot.env.update(_check_env(env, "env"))
        if init_code is not None:
            if not isinstance(init_code, str):
                raise TypeError(f"init_code must be a str, got {type(init_code).__name__}")
            slot.init_code = init_code or None

    async def _ensure_locked(self, slot: _Slot, phase: str = "starting") -> Kernel:
        kernel = slot.kernel
        if kernel is not None and kernel.alive():
            await self._apply_settings(slot, kernel)
            if slot.init_pending:
                await self._run_init(slot, kernel)
            return kernel
        if kernel is not None:
            slot.kernel = None
            await self._retire(kernel)
        slot.phase = phase
        try:
            kernel, from_spare = await self._acquire(slot)
            slot.kernel = kernel
            slot.kernels_assigned += 1
            slot.idle_since = time.monotonic()
            slot.init_pending = slot.init_code is not None
            if from_spare:
                slot.applied_cwd, slot.applied_env = None, {}
            else:
                slot.applied_cwd, slot.applied_env = slot.cwd, dict(slot.env)
            await self._apply_settings(slot, kernel)
            await self._run_init(slot, kernel)
            return kernel
        finally:
            slot.phase = None if slot.phase == phase else slot.phase

    async def _acquire(self, slot: _Slot) -> tuple[Kernel, bool]:
        if not self._started:
            await self.start(wait=False)
        if self.spare:
            kernel = await self._take_spare()
            if kernel is not None:
                return kernel, True
        kernel = await self._start_kernel(cwd=slot.cwd, env=self._kernel_env(slot.env))
        if self.spare and self._spare_task is None and self._started:
            self._fill_spare(delay=REFILL_DELAY_S)
        return kernel, False

    async def _take_spare(self) -> Kernel | None:
        while (task := self._spare_task) is not None:
            if not task.done():
                try:
                    await asyncio.shield(task)
                except asyncio.CancelledError:
                    if not task.cancelled():
                        raise  # we were cancelled, not the spare
                except Exception:
                    pass
            if self._spare_task is not task:
                continue  # another key took it meanwhile; wait for the refill
            self._spare_task = None
            if task.cancelled() or task.exception() is not None:
                if not task.cancelled():
                    log.warning("the warm spare kernel failed to start: %s", task.exception())
                return None
            kernel = task.result()
            if self._started:
                self._fill_spare(delay=REFILL_DELAY_S)
            if kernel.alive():
                return kernel
            await self._retire(kernel)
        return None

    def _fill_spare(self, delay: float) -> None:
        async def make() -> Kernel:
            if delay:
                await asyncio.sleep(delay)
            return await self._start_kernel(cwd=None, env=self._kernel_env(), from_spare=True)

        self._spare_task = asyncio.create_task(make(), name="loopbook-spare-kernel")

    async def _start_kernel(self, *, cwd: str | None, env: dict[str, str], from_spare: bool = False) -> Kernel:
        kernel = Kernel(
            argv=self._argv,
            runtime_dir=self._runtime(),
            context=self._zmq_context(),
            env=env,
            cwd=cwd,
            from_spare=from_spare,
        )
        self._kernels.add(kernel)
        _owned_kernels.add(kernel)
        try:
            await kernel.start(timeout=self.start_timeout)
        except BaseException:
            self._kernels.discard(kernel)
            _owned_kernels.discard(kernel)
            raise
        return kernel

    async def _apply_settings(self, slot: _Slot, kernel: Kernel) -> None:
        """Bring a kernel's cwd and environment up to the key's settings with one silent run."""
        cwd = slot.cwd if slot.cwd != slot.applied_cwd else None
        env = {k: v for k, v in slot.env.items() if slot.applied_env.get(k) != v}
        if cwd is None and not env:
            return
        lines = ["import os as _loopbook_os"]
        if cwd is not None:
            lines.append(f"_loopbook_os.chdir({cwd!r})")
        if env:
            lines.append(f"_loopbook_os.environ.update({env!r})")
        lines.append("del _loopbook_os")
        result = await self._silent(kernel, "\n".join(lines))
        if result.status != "ok":
            raise KernelInitError(_setup_failed("Setting the kernel's folder and environment", result), result)
        slot.applied_cwd = slot.cwd
        slot.applied_env.update(env)

    async def _run_init(self, slot: _Slot, kernel: Kernel) -> None:
        if not slot.init_code:
            slot.init_pending = False
            return
        result = await self._silent(kernel, slot.init_code, timeout=self.default_timeout)
        if result.status != "ok":
            message = _setup_failed("The key's init_code", result)
            result.message = message
            if not kernel.alive():
                await self._retire(kernel)
            raise KernelInitError(message, result)
        slot.init_pending = False

    async def _silent(self, kernel: Kernel, code: str, timeout: float | None = SETUP_TIMEOUT_S) -> ExecResult:
        return await kernel.execute(
            code,
            timeout=timeout,
            silent=True,
            store_history=False,
            cap_chars=self.output_cap_chars,
            display_cap_chars=self.display_cap_chars,
            interrupt_grace_s=self.interrupt_grace_s,
        )

    # -- background work and cleanup ------------------------------------------------------------

    async def _watch(self) -> None:
        """Notice kernels that die while idle, keep the spare alive, cull idle kernels."""
        interval = 1.0 if self.cull_idle_s is None else min(1.0, max(self.cull_idle_s / 4, 0.1))
        while True:
            await asyncio.sleep(interval)
            try:
                await self._watch_once()
            except Exception:
                log.exception("kernel watcher step failed; it keeps running")

    async def _watch_once(self) -> None:
        for slot in list(self._slots.values()):
            kernel = slot.kernel
            if kernel is None or slot.lock.locked():
                continue
            if not kernel.alive():
                if not kernel.closed:
                    log.warning("the kernel for %r died while idle (exit code %s)", slot.key, kernel.poll())
                    await self._retire(kernel)
                continue
            if self.cull_idle_s is not None and time.monotonic() - slot.idle_since > self.cull_idle_s:
                async with slot.lock:
                    if slot.kernel is kernel and kernel.alive():
                        log.info("culling the kernel for %r after %.0f s idle", slot.key, self.cull_idle_s)
                        slot.kernel = None
                        kernel.stopping = "cull"
                        await self._retire(kernel, polite=True)
        task = self._spare_task
        if task is not None and task.done() and not task.cancelled() and task.exception() is None:
            if not task.result().alive():
                self._spare_task = None
                await self._retire(task.result())
                self._fill_spare(delay=0.0)

    async def _retire(self, kernel: Kernel, polite: bool = False) -> None:
        try:
            await (kernel.shutdown() if polite else kernel.kill())
        finally:
            self._kernels.discard(kernel)
            _owned_kernels.discard(kernel)

    def _in_background(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _runtime(self) -> Path:
        if self._runtime_dir is None or not self._runtime_dir.is_dir():
            self._runtime_dir, self._runtime_created = make_runtime_dir(self._runtime_arg)
            if self._runtime_created:
                _owned_dirs.add(self._runtime_dir)
        return self._runtime_dir

    def _zmq_context(self) -> zmq.asyncio.Context:
        if self._context is None:
            self._context = zmq.asyncio.Context()
        return self._context

    def _kernel_env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ)
        # A kernel started under pytest would see this and stop capturing fd-level output.
        env.pop("PYTEST_CURRENT_TEST", None)
        env.update(self.env)
        env.update(extra or {})
        env.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")  # quiets a debugger warning at every start
        return env

    def _remove_runtime_dir(self) -> None:
        runtime = self._runtime_dir
        if runtime is None or not runtime.exists():
            return
        if self._runtime_created:
            shutil.rmtree(runtime, ignore_errors=True)
            _owned_dirs.discard(runtime)
        else:  # someone else's folder: remove only our files
            for path in runtime.glob("k-*"):
                path.unlink(missing_ok=True)
        self._runtime_dir = None



# What the exit hook must clean even when a pool was dropped without shutdown_all().
_owned_kernels: set[Kernel] = set()
_owned_dirs: set[Path] = set()


@atexit.register
def _kill_leftover_kernels() -> None:
    """SIGKILL every kernel process group still running and remove the runtime folders we made."""
    for kernel in list(_owned_kernels):
        try:
            kernel.kill_now()
        except Exception:  # atexit must not raise; the kernels' parent-pid poller is the last net
            pass
    for path in list(_owned_dirs):
        shutil.rmtree(path, ignore_errors=True)


def _check_key(key: Any) -> str:
    if not isinstance(key, str) or not key:
        raise ValueError(f"key must be a non-empty string such as a dialog id, got {key!r}")
    return key


def _check_env(env: Any, what: str) -> dict[str, str]:
    if env is None:
        return {}
    if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
        raise ValueError(f"{what} must be a dict of str to str (environment variables), got {env!r}")
    return dict(env)


def _check_timeout(value: Any, what: str, *, allow_none: bool) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or math.isnan(value):
        raise ValueError(f"{what} must be a positive number of seconds (or None for no limit), got {value!r}")


def _setup_failed(what: str, result: ExecResult) -> str:
    if result.error:
        reason = f"{result.error.get('ename')}: {result.error.get('evalue')}"
    else:
        reason = result.message or result.status
    return f"{what} failed, so the cell did not run ({reason}). Fix it and run again; the dialog is unchanged."
