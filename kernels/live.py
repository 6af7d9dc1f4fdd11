"""Live output of a running cell: the capture's changes, coalesced into batches of output events.

A consumer keeps a list of nbformat outputs for the cell, starting empty, and applies each batch in
order (`apply_events` is the reference). Events are nbformat-shaped:

- `{"output_type": "clear_output", "wait": False}`: empty the list.
- an nbformat output with `"index": i`: it becomes output i (appended when i is the list's length).
- a stream output with `"index": i` and `"start": k`: output i's text becomes its first k characters
  followed by `"text"` (how a carriage return rewrites the last line, and how text is appended).

Stream text arrives folded (`capture.fold`), consecutive stream text merged, `clear_output(wait=True)`
applied (the new outputs replace the old in one batch, so nothing flickers) and `update_display_data`
as the updated output at its index. Batches are at most one per `interval_s`: the first change after a
quiet spell goes out at once, a flood goes out every `interval_s`. While the cell runs, text past the
head of the output cap is shown as a marker and the last `tail_chars`; the last batch brings the view
to exactly the stored outputs of the ExecResult.
"""

from __future__ import annotations

import inspect
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

from .capture import OutputCapture

log = logging.getLogger(__name__)

OnBatch = Callable[[list[dict[str, Any]]], "Awaitable[None] | None"]

INTERVAL_S = 0.04
TAIL_CHARS = 10_000
CLEAR = {"output_type": "clear_output", "wait": False}


class LiveOutputs:
    """The live view of one execution, and the batches that keep a consumer's copy of it in step."""

    def __init__(self, on_batch: OnBatch, *, interval_s: float = INTERVAL_S, tail_chars: int = TAIL_CHARS):
        self.on_batch = on_batch
        self.interval_s = interval_s
        self.tail_chars = tail_chars
        self.outputs: list[dict[str, Any]] = []  # the consumer's copy after every batch so far
        self.batches = 0
        self.closed = False
        self._dirty = False
        self._last_sent = -math.inf

    def touch(self) -> None:
        """The capture changed; a batch is due within `interval_s`."""
        self._dirty = True

    def due(self) -> float:
        """When (time.monotonic) the next batch should go out; inf when nothing changed."""
        return self._last_sent + self.interval_s if self._dirty and not self.closed else math.inf

    async def flush(self, capture: OutputCapture) -> None:
        """Send what changed in the capture since the last batch."""
        self._dirty = False
        self._last_sent = time.monotonic()
        await self._send(capture.snapshot(self.tail_chars))

    async def close(self, outputs: list[dict[str, Any]]) -> None:
        """Send the last batch: the view becomes exactly `outputs` (the stored result)."""
        if self.closed:
            return
        self.closed = True
        await self._send([dict(o) for o in outputs])

    async def _send(self, new: list[dict[str, Any]]) -> None:
        events = diff_outputs(self.outputs, new)
        self.outputs = new
        if not events:
            return
        self.batches += 1
        try:
            ret = self.on_batch(events)
            if inspect.isawaitable(ret):
                await ret
        except Exception:  # a broken display must not break the run
            log.exception("on_batch callback failed; the output is still captured")


def diff_outputs(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The events that turn the output list `old` into `new`."""
    if len(new) < len(old):
        return [dict(CLEAR)] + [{**out, "index": i} for i, out in enumerate(new)]
    events: list[dict[str, Any]] = []
    for i, out in enumerate(new):
        prev = old[i] if i < len(old) else None
        if prev == out:
            continue
        if prev is not None and _is_stream(prev) and _is_stream(out) and prev["name"] == out["name"]:
            start = common_prefix(prev["text"], out["text"])
            events.append({**out, "text": out["text"][start:], "index": i, "start": start})
        else:
            events.append({**out, "index": i})
    return events


def apply_events(outputs: list[dict[str, Any]], events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Apply one batch to a consumer's output list, in place; returns the list."""
    for event in events:
        if event["output_type"] == "clear_output":
            outputs.clear()
            continue
        out = {k: v for k, v in event.items() if k not in ("index", "start")}
        i = event["index"]
        if "start" in event:
            out["text"] = outputs[i]["text"][: event["start"]] + out["text"]
        if i == len(outputs):
            outputs.append(out)
        else:
            outputs[i] = out
    return outputs


def common_prefix(a: str, b: str) -> int:
    """The length of the longest common prefix of a and b (C-speed comparisons, not a char loop)."""
    if b.startswith(a):
        return len(a)
    lo, hi = 0, min(len(a), len(b))
    # Most changes rewrite only the last line: try that before bisecting.
    line = a.rfind("\n", 0, hi) + 1
    if a[:line] == b[:line]:
        lo = line
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _is_stream(output: dict[str, Any]) -> bool:
    return output.get("output_type") == "stream"
