"""Several sequences from one prompt on backends that decode one at a time: concurrent or in turn. A sequence
may have a prompt of its own (`seq_messages[i]`, None: the shared one).

llama.cpp in process batches them itself (batch.py). A remote server batches what arrives together
(llama.cpp's server with --parallel slots, vLLM), so the remote backends send the k requests at once.
"""

from __future__ import annotations

import queue
import threading
from typing import Iterator

from ..protocol import Event, Figures, Message, ModelError, Sampling, ShouldStop, done_event


def _tagged(events: Iterator[Event], seq: int) -> Iterator[Event]:
    try:
        for ev in events:
            yield {**ev, "seq": seq}
    except ModelError as e:  # one sequence that cannot be served does not take the others down
        yield {**done_event("", "error", Figures(), error=str(e)), "seq": seq}


def prompt_of(messages: list[Message], seq_messages: list[list[Message] | None] | None, seq: int) -> list[Message]:
    """The prompt sequence `seq` reads: its own when it has one, else the shared one."""
    own = seq_messages[seq] if seq_messages and seq < len(seq_messages) else None
    return own if own is not None else messages


def sequential_streams(backend, messages: list[Message], samplings: list[Sampling], cache_key: str | None,
                       should_stop: ShouldStop | None,
                       seq_messages: list[list[Message] | None] | None = None) -> Iterator[Event]:
    """One sequence after another, each event tagged with its "seq"."""
    for seq, sampling in enumerate(samplings):
        msgs = prompt_of(messages, seq_messages, seq)
        key = cache_key if msgs is messages else None
        yield from _tagged(backend.stream(msgs, sampling, key, should_stop=should_stop), seq)


def concurrent_streams(backend, messages: list[Message], samplings: list[Sampling],
                       should_stop: ShouldStop | None,
                       seq_messages: list[list[Message] | None] | None = None) -> Iterator[Event]:
    """All sequences at once, one thread each; events arrive as the server sends them, tagged "seq"."""
    out: queue.Queue[Event | None] = queue.Queue()

    def run(seq: int, sampling: Sampling) -> None:
        try:
            msgs = prompt_of(messages, seq_messages, seq)
            for ev in _tagged(backend.stream(msgs, sampling, None, should_stop=should_stop), seq):
                out.put(ev)
        except Exception as e:  # noqa: BLE001 - reported as this sequence's end, never lost
            out.put({**done_event("", "error", Figures(), error=f"{type(e).__name__}: {e}"), "seq": seq})
        finally:
            out.put(None)

    threads = [threading.Thread(target=run, args=(i, s), daemon=True, name=f"model-seq-{i}")
               for i, s in enumerate(samplings)]
    for t in threads:
        t.start()
    running = len(threads)
    while running:
        ev = out.get()
        if ev is None:
            running -= 1
        else:
            yield ev
