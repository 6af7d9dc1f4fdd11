"""Live event logs for work in progress (a streaming reply, a running loop), replayed to late subscribers."""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator


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

    def open(self, key: str) -> Live:
        live = Live(key)
        self._logs[key] = live
        return live

    def get(self, key: str) -> Live | None:
        return self._logs.get(key)

    def running(self, key: str) -> bool:
        live = self._logs.get(key)
        return live is not None and not live.closed
