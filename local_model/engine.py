"""One resident backend, one worker thread, generations in arrival order, off the event loop."""
from __future__ import annotations

import asyncio
import queue
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

from .backends.many import sequential_streams
from .protocol import Backend, Event, Figures, Message, ModelError, Sampling, done_event


@dataclass(eq=False)
class _Request:
    id: str
    messages: list[Message]
    sampling: Sampling
    cache_key: str | None
    sink: Callable[[Event | BaseException], None]
    samplings: list[Sampling] | None = None  # several sequences from one prompt (stream_many)
    seq_messages: list[list[Message] | None] | None = None  # a sequence's own prompt (None: `messages`)
    submitted: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    done_left: int = 1


class Engine:
    """Serializes generations on one backend; each caller streams its own events.

    A Stop is `cancel(request_id)`: a queued request leaves the queue at once (its stream ends
    with a "cancelled" done event), a running one stops within a token or two.
    """

    def __init__(self, backend: Backend):
        self.backend = backend
        self._cv = threading.Condition()
        self._queue: deque[_Request] = deque()
        self._requests: dict[str, _Request] = {}
        self._current: _Request | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="local-model-engine", daemon=True)
        self._thread.start()

    @property
    def manifest(self) -> dict[str, Any]:
        return self.backend.manifest

    @property
    def queue_depth(self) -> int:
        """Requests waiting (not counting the one running)."""
        with self._cv:
            return len(self._queue)

    @property
    def busy(self) -> bool:
        with self._cv:
            return self._current is not None

    def submit(self, messages: list[Message], sampling: Sampling | None, cache_key: str | None,
               request_id: str | None, sink: Callable[[Event | BaseException], None],
               samplings: list[Sampling] | None = None,
               seq_messages: list[list[Message] | None] | None = None) -> str:
        """Queue a generation whose events go to `sink` (from the worker thread); returns its id.

        With `samplings`, one request yields that many sequences from the same prompt: every event carries
        "seq", and there is one done event per sequence. `seq_messages[i]`, when given, is sequence i's own
        prompt (sequence 0 always reads `messages`); the in-process model reads the prefix they share once.
        """
        rid = request_id or uuid.uuid4().hex
        # Copies, so the caller's dialog is never touched and later edits do not race the worker.
        msgs = [dict(m) for m in messages]
        own = None
        if seq_messages and samplings and any(m is not None for m in seq_messages[1:]):
            own = [None] + [[dict(x) for x in m] if m is not None else None for m in seq_messages[1:len(samplings)]]
        req = _Request(rid, msgs, sampling or Sampling(), cache_key, sink, samplings=samplings, seq_messages=own,
                       done_left=len(samplings) if samplings else 1)
        with self._cv:
            if self._closed:
                raise ModelError("the model engine is closed")
            if rid in self._requests:
                raise ModelError(f"request id {rid!r} is already queued or running")
            self._requests[rid] = req
            self._queue.append(req)
            self._cv.notify()
        return rid

    def cancel(self, request_id: str) -> bool:
        """Stop a request; True when it was queued or running. Cancelling twice is harmless."""
        with self._cv:
            req = self._requests.get(request_id)
            if req is None or req.cancelled:
                return False
            req.cancelled = True
            queued = req in self._queue
            if queued:
                self._queue.remove(req)
                del self._requests[request_id]
        if queued:
            waited = round(time.perf_counter() - req.submitted, 4)
            for seq in range(req.done_left):
                ev = done_event("", "cancelled", Figures(extra={"queue_s": waited}))
                if req.samplings:
                    ev["seq"] = seq
                req.sink(ev)
        return True

    async def stream(self, messages: list[Message], sampling: Sampling | None = None,
                     cache_key: str | None = None, request_id: str | None = None,
                     samplings: list[Sampling] | None = None,
                     seq_messages: list[list[Message] | None] | None = None) -> AsyncIterator[Event]:
        """Token events then one done event; raises ModelError when the request cannot be served.

        With `samplings` (k of them): k sequences from the one prompt (or sequence i from `seq_messages[i]`),
        each event tagged "seq", one done event per sequence; the stream ends after the last. Leaving the loop
        early (a closed page) cancels the request.
        """
        left = len(samplings) if samplings else 1
        loop = asyncio.get_running_loop()
        # Events pile up in a buffer and the loop is woken once per batch: a consumer that falls
        # behind takes what piled up in one wake-up instead of one cross-thread call per token.
        buf: deque[Event | BaseException] = deque()
        lock = threading.Lock()
        wake = asyncio.Event()
        scheduled = False

        def sink(ev: Event | BaseException) -> None:
            nonlocal scheduled
            with lock:
                buf.append(ev)
                if scheduled:
                    return
                scheduled = True
            try:
                loop.call_soon_threadsafe(wake.set)
            except RuntimeError:
                pass  # the loop is gone; nobody is listening

        rid = self.submit(messages, sampling, cache_key, request_id, sink, samplings=samplings,
                          seq_messages=seq_messages)
        finished = False
        try:
            while not finished:
                await wake.wait()
                with lock:
                    batch = list(buf)
                    buf.clear()
                    scheduled = False
                    wake.clear()
                for ev in batch:
                    if isinstance(ev, BaseException):
                        finished = True
                        raise ev
                    if ev.get("type") == "done":
                        left -= 1
                        finished = left == 0
                    yield ev
                    if finished:
                        break
        finally:
            if not finished:
                self.cancel(rid)

    def generate(self, messages: list[Message], sampling: Sampling | None = None,
                 cache_key: str | None = None, request_id: str | None = None,
                 on_token: Callable[[str], None] | None = None) -> Event:
        """Blocking convenience (eval runner, scripts): returns the done event."""
        q: queue.Queue[Event | BaseException] = queue.Queue()
        self.submit(messages, sampling, cache_key, request_id, q.put)
        while True:
            ev = q.get()
            if isinstance(ev, BaseException):
                raise ev
            if ev.get("type") == "done":
                return ev
            if on_token is not None:
                on_token(ev["text"])

    def generate_many(self, messages: list[Message], samplings: list[Sampling], cache_key: str | None = None,
                      request_id: str | None = None) -> list[Event]:
        """Blocking: the done events of k sequences from one prompt, in sequence order."""
        q: queue.Queue[Event | BaseException] = queue.Queue()
        self.submit(messages, None, cache_key, request_id, q.put, samplings=samplings)
        done: dict[int, Event] = {}
        while len(done) < len(samplings):
            ev = q.get()
            if isinstance(ev, BaseException):
                raise ev
            if ev.get("type") == "done":
                done[ev["seq"]] = ev
        return [done[i] for i in sorted(done)]

    def close(self, timeout: float = 10.0) -> None:
        """Cancel everything, stop the worker and close the backend."""
        with self._cv:
            self._closed = True
            pending = list(self._requests)
            self._cv.notify_all()
        for rid in pending:
            self.cancel(rid)
        self._thread.join(timeout)
        close = getattr(self.backend, "close", None)
        if close is not None:
            close()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._closed:
                    self._cv.wait()
                if not self._queue:
                    return
                req = self._queue.popleft()
                self._current = req
            started = time.perf_counter()
            try:
                for ev in self._events(req):
                    if ev.get("type") == "done":
                        ev["figures"]["queue_s"] = round(started - req.submitted, 4)
                        req.done_left -= 1
                        if req.done_left == 0:
                            self._finish(req)  # idle before the caller hears the last "done"
                    req.sink(ev)
            except ModelError as e:
                self._finish(req)
                req.sink(e)
            except Exception as e:  # noqa: BLE001 - the worker must survive any one request
                self._finish(req)
                err = ModelError(f"the model failed: {type(e).__name__}: {e}")
                err.__cause__ = e
                req.sink(err)
            finally:
                self._finish(req)

    def _events(self, req: _Request):
        stop = lambda r=req: r.cancelled  # noqa: E731
        if not req.samplings:
            return self.backend.stream(req.messages, req.sampling, req.cache_key, should_stop=stop)
        many = getattr(self.backend, "stream_many", None)
        if many is None:
            return sequential_streams(self.backend, req.messages, req.samplings, req.cache_key, stop, req.seq_messages)
        return many(req.messages, req.samplings, req.cache_key, should_stop=stop, seq_messages=req.seq_messages)

    def _finish(self, req: _Request) -> None:
        with self._cv:
            if self._current is req:
                self._current = None
            self._requests.pop(req.id, None)
