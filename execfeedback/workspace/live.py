"""Live event logs for work in progress (a streaming reply, a running loop), replayed to late subscribers."""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator

from kernels import apply_events


class Live:
    """An append-only event log that SSE streams follow in batches."""

    def __init__(self, key: str):
        self.key = key
        self.events: list[dict[str, Any]] = []
        self.closed = False
        self._changed = asyncio.Event()

    def publish(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        self._changed.set()

    def close(self) -> None:
        self.closed = True
        self._changed.set()

    async def follow(self, start: int = 0, batch_s: float = 0.04) -> AsyncIterator[list[dict[str, Any]]]:
        """Yield new events in batches, so a browser keeps up with hundreds of tokens a second."""
        pos = start
        while True:
            if pos >= len(self.events):
                if self.closed:
                    return
                self._changed.clear()
                if pos >= len(self.events) and not self.closed:
                    await self._changed.wait()
                # Let a few more tokens arrive: one swap per batch instead of one per token.
                await asyncio.sleep(batch_s)
            batch = self.events[pos:]
            pos += len(batch)
            if batch:
                yield batch


class LiveHub:
    """The live logs of one process, by key (e.g. "reply-12", "solve-12")."""

    def __init__(self):
        self._logs: dict[str, Live] = {}
        self._outputs: dict[str, OutputsLive] = {}
        self._opened = asyncio.Condition()

    def open(self, key: str) -> Live:
        live = Live(key)
        self._logs[key] = live
        return live

    def get(self, key: str) -> Live | None:
        return self._logs.get(key)

    def running(self, key: str) -> bool:
        live = self._logs.get(key)
        return live is not None and not live.closed

    async def open_outputs(self, key: str) -> OutputsLive:
        """A running cell's live outputs (e.g. "run-12"), replacing the last run's; wakes those waiting for it."""
        view = self._outputs[key] = OutputsLive(key)
        async with self._opened:
            self._opened.notify_all()
        return view

    def outputs(self, key: str) -> OutputsLive | None:
        """The live outputs of the run going on now, None when none runs."""
        view = self._outputs.get(key)
        return view if view is not None and not view.closed else None

    def close_outputs(self, view: OutputsLive) -> None:
        view.close()
        if self._outputs.get(view.key) is view:
            del self._outputs[view.key]

    async def wait_outputs(self, key: str, timeout: float) -> OutputsLive | None:
        """The run going on now, or the next to start within `timeout` seconds (a page opens its stream as it
        sends Run, so the stream may arrive first)."""
        async def opened():
            async with self._opened:
                await self._opened.wait_for(lambda: self.outputs(key) is not None)
        if self.outputs(key) is None and timeout > 0:
            try:
                await asyncio.wait_for(opened(), timeout)
            except asyncio.TimeoutError:
                return None
        return self.outputs(key)


class OutputsLive:
    """The live outputs of one running cell: the kernel's batches (kernels.live) applied to one view, which any
    number of subscribers follow, each from where it is (a page reloaded mid-run starts from nothing)."""

    def __init__(self, key: str):
        self.key = key
        self.outputs: list[dict[str, Any]] = []
        self.version = 0
        self.closed = False
        self._changed = asyncio.Event()

    def on_batch(self, events: list[dict[str, Any]]) -> None:
        """The kernel's `on_batch`: apply the batch to the view (kernels.apply_events) and wake the followers."""
        apply_events(self.outputs, events)
        self.version += 1
        self._changed.set()

    def close(self) -> None:
        self.closed = True
        self._changed.set()

    async def follow(self) -> AsyncIterator[tuple[bool, list[int], list[dict[str, Any]]]]:
        """Yield (cleared, changed indices, outputs) whenever the view changed since this follower last looked:
        `cleared` means drop every output past len(outputs) first. apply_events replaces an output's dict when it
        changes, so identity tells what changed; a follower's first look sends the whole view."""
        seen: list[dict[str, Any]] = []
        while True:
            version, now = self.version, list(self.outputs)
            cleared = len(now) < len(seen)
            changed = [i for i, o in enumerate(now) if cleared or i >= len(seen) or seen[i] is not o]
            if cleared or changed:
                seen = now
                yield cleared, changed, now
            if self.closed:
                return
            self._changed.clear()
            if version == self.version and not self.closed:  # nothing arrived while we yielded
                await self._changed.wait()
