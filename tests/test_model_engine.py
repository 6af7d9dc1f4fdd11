"""The engine: one resident model, a queue, cancel, off the event loop (real SmolLM2 GGUF)."""
from __future__ import annotations

import asyncio
import queue
import threading

import pytest

from local_model import Engine, ModelError, Sampling, load_backend

STORY = [{"role": "user", "content": "Tell a long story about a dragon who learns to cook."}]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    e = Engine(load_backend("smollm2-135m", data_dir=tmp_path_factory.mktemp("data")))
    yield e
    e.close()


def run(coro):
    return asyncio.run(coro)


async def collect(engine, messages, sampling, **kw):
    return [ev async for ev in engine.stream(messages, sampling, **kw)]


def test_stream_yields_tokens_then_done(engine):
    events = run(collect(engine, STORY, Sampling(max_tokens=12), cache_key="e1"))
    assert events[-1]["type"] == "done" and events[-1]["finish_reason"] == "length"
    assert events[-1]["figures"]["completion_tokens"] == 12
    assert "queue_s" in events[-1]["figures"]
    assert events[-1]["text"] == "".join(e["text"] for e in events[:-1])
    assert not engine.busy and engine.queue_depth == 0


def test_cancel_stops_within_a_token_or_two(engine):
    """Cancel from inside the worker's own event flow, so the count does not depend on timing."""
    got: queue.Queue = queue.Queue()
    seen, cancelled = [], []

    def sink(ev):
        if not isinstance(ev, BaseException) and ev["type"] == "token":
            seen.append(ev)
            if len(seen) == 3:
                cancelled.append(engine.cancel("stop-me"))
        got.put(ev)

    engine.submit(STORY, Sampling(max_tokens=200), None, "stop-me", sink)
    while True:
        ev = got.get(timeout=120)
        if ev["type"] == "done":
            break
    assert cancelled == [True]
    assert ev["finish_reason"] == "cancelled"
    assert ev["figures"]["completion_tokens"] <= 3 + 2
    assert engine.cancel("stop-me") is False  # a second Stop is harmless


def test_cancel_twice_from_the_event_loop(engine):
    async def main():
        events, cancels = [], []
        async for ev in engine.stream(STORY, Sampling(max_tokens=300), request_id="twice"):
            events.append(ev)
            if len([e for e in events if e["type"] == "token"]) == 2 and not cancels:
                cancels.append(engine.cancel("twice"))
                cancels.append(engine.cancel("twice"))
        return events, cancels

    events, cancels = run(main())
    assert cancels == [True, False]
    done = events[-1]
    assert done["type"] == "done" and done["finish_reason"] == "cancelled"
    assert done["figures"]["completion_tokens"] < 300
    # The engine keeps serving.
    assert engine.generate(STORY, Sampling(max_tokens=3))["finish_reason"] == "length"


def test_two_concurrent_streams_run_in_order(engine):
    order, depth = [], []

    async def consume(name, rid):
        async for ev in engine.stream(STORY, Sampling(max_tokens=10), request_id=rid):
            order.append((name, ev["type"]))
            if name == "first" and ev["type"] == "token" and not depth:
                depth.append((engine.queue_depth, engine.busy))

    async def main():
        await asyncio.gather(consume("first", "q1"), consume("second", "q2"))

    run(main())
    first_done = order.index(("first", "done"))
    second_start = next(i for i, (n, _) in enumerate(order) if n == "second")
    assert first_done < second_start
    assert order[-1] == ("second", "done")
    assert depth == [(1, True)]


def test_cancelling_a_queued_request_removes_it(engine):
    async def main():
        results = {}

        async def consume(name, rid, n):
            results[name] = [ev async for ev in engine.stream(STORY, Sampling(max_tokens=n), request_id=rid)]

        first = asyncio.create_task(consume("first", "long", 40))
        second = asyncio.create_task(consume("second", "queued", 40))
        while engine.queue_depth < 1:
            await asyncio.sleep(0.01)
        assert engine.cancel("queued") is True
        assert engine.queue_depth == 0
        await asyncio.gather(first, second)
        return results

    results = run(main())
    assert results["second"] == [results["second"][0]]
    assert results["second"][0]["type"] == "done" and results["second"][0]["finish_reason"] == "cancelled"
    assert results["first"][-1]["finish_reason"] == "length"


def test_model_errors_reach_the_caller_and_the_engine_survives(engine):
    huge = [{"role": "user", "content": "word " * 5000}]

    async def main():
        with pytest.raises(ModelError) as e:
            await collect(engine, huge, Sampling(max_tokens=4))
        return e.value

    err = run(main())
    assert "n_ctx" in str(err)
    with pytest.raises(ModelError):
        engine.generate([{"role": "robot", "content": "x"}])
    assert engine.generate(STORY, Sampling(max_tokens=2))["type"] == "done"


def test_generation_runs_off_the_event_loop(engine):
    """While a generation runs the loop keeps ticking."""
    async def main():
        ticks = 0
        stop = asyncio.Event()

        async def ticker():
            nonlocal ticks
            while not stop.is_set():
                ticks += 1
                await asyncio.sleep(0)

        t = asyncio.create_task(ticker())
        events = await collect(engine, STORY, Sampling(max_tokens=20))
        stop.set()
        await t
        return ticks, events

    ticks, events = run(main())
    assert events[-1]["type"] == "done"
    assert ticks > len(events)
    assert threading.current_thread() is threading.main_thread()
