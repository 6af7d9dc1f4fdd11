"""k candidates from one prompt in one batch, with the real SmolLM2-135M GGUF."""
from __future__ import annotations

import asyncio

import pytest

from local_model import Engine, ModelError, Sampling, load_backend
from local_model.backends.batch import MAX_SEQS, fit_sequences

MSGS = [{"role": "system", "content": "You write Python."},
        {"role": "user", "content": "Write a function that adds two numbers."}]


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    b = load_backend("smollm2-135m", n_ctx=1024, data_dir=tmp_path_factory.mktemp("data"))
    yield b
    b.close()


def _by_seq(events):
    done = {ev["seq"]: ev for ev in events if ev["type"] == "done"}
    streamed: dict[int, str] = {}
    for ev in events:
        if ev["type"] == "token":
            streamed[ev["seq"]] = streamed.get(ev["seq"], "") + ev["text"]
    return done, streamed


def test_each_sequence_streams_and_ends_once(backend):
    samplings = [Sampling(max_tokens=24)] + [Sampling(max_tokens=24, temperature=0.9, seed=s) for s in (1, 2, 3)]
    events = list(backend.stream_many(MSGS, samplings, cache_key="d"))
    done, streamed = _by_seq(events)
    assert sorted(done) == [0, 1, 2, 3] and sum(ev["type"] == "done" for ev in events) == 4
    for seq, ev in done.items():
        assert ev["text"] == streamed.get(seq, "")  # what streamed is exactly what ended
        assert 0 < ev["figures"]["completion_tokens"] <= 24
        assert ev["figures"]["batch_sequences"] == 4
    assert len({ev["text"] for ev in done.values()}) > 1  # seeds 1-3 at 0.9 sample something else than greedy


def test_greedy_sequences_agree_and_seeds_reproduce(backend):
    three_greedy = list(backend.stream_many(MSGS, [Sampling(max_tokens=16)] * 3))
    texts = [ev["text"] for ev in sorted((e for e in three_greedy if e["type"] == "done"), key=lambda e: e["seq"])]
    assert texts[0] and texts[0] == texts[1] == texts[2]
    seeded = [Sampling(max_tokens=16, temperature=1.0, seed=7), Sampling(max_tokens=16, temperature=1.0, seed=8)]
    a, _ = _by_seq(backend.stream_many(MSGS, seeded))
    b, _ = _by_seq(backend.stream_many(MSGS, seeded))
    assert [a[i]["text"] for i in (0, 1)] == [b[i]["text"] for i in (0, 1)]


def test_the_dialog_prefix_cache_still_serves_the_prompt(backend):
    list(backend.stream_many(MSGS, [Sampling(max_tokens=4)] * 2, cache_key="cached"))
    longer = MSGS + [{"role": "assistant", "content": "def add(a, b): return a + b"},
                     {"role": "user", "content": "Now subtract."}]
    done, _ = _by_seq(backend.stream_many(longer, [Sampling(max_tokens=4)] * 2, cache_key="cached"))
    f = done[0]["figures"]
    assert f["cached_prompt_tokens"] > 0 and f["evaluated_prompt_tokens"] < f["prompt_tokens"]


def test_a_sequence_with_its_own_prompt_reads_only_what_it_does_not_share(backend):
    feedback = MSGS + [{"role": "assistant", "content": "def add(a, b): return a - b"},
                       {"role": "user", "content": "add(1, 2) returned -1, expected 3. Fix it."}]
    other = [{"role": "user", "content": "Say hello in French."}]  # shares nothing but the template's start
    greedy = Sampling(max_tokens=20)
    alone = {name: _by_seq(backend.stream_many(m, [greedy]))[0][0] for name, m in
             (("feedback", feedback), ("task", MSGS), ("other", other))}
    events = list(backend.stream_many(feedback, [greedy, greedy, greedy, greedy], cache_key="branch",
                                      seq_messages=[None, None, MSGS, other]))
    done, streamed = _by_seq(events)
    # each sequence follows its own prompt: greedy, it begins as that prompt alone does (not token for token to
    # the end: a batch's float sums differ from a lone sequence's, and this small model has near ties)
    for i, name in enumerate(("feedback", "feedback", "task", "other")):
        assert done[i]["text"][:12] == alone[name]["text"][:12], (i, done[i]["text"], alone[name]["text"])
    assert done[2]["text"][:12] != done[0]["text"][:12] and all(streamed[i] == done[i]["text"] for i in range(4))
    f = {i: done[i]["figures"] for i in range(4)}
    assert f[2]["prompt_tokens"] == alone["task"]["figures"]["prompt_tokens"] < f[0]["prompt_tokens"]
    # the task prompt is the feedback prompt's beginning: at most its last few tokens are its own
    assert f[2]["evaluated_prompt_tokens"] <= 3 and f[2]["cached_prompt_tokens"] >= f[2]["prompt_tokens"] - 3
    assert f[3]["evaluated_prompt_tokens"] > f[2]["evaluated_prompt_tokens"]


def test_stop_cancels_every_sequence(backend):
    seen = []

    def stop():
        return len(seen) >= 4

    events = []
    for ev in backend.stream_many([{"role": "user", "content": "Tell a long story."}],
                                  [Sampling(max_tokens=100, temperature=0.8, seed=s) for s in range(3)],
                                  should_stop=stop):
        events.append(ev)
        if ev["type"] == "token":
            seen.append(ev)
    done, _ = _by_seq(events)
    assert [done[i]["finish_reason"] for i in range(3)] == ["cancelled"] * 3
    assert all(ev["figures"]["completion_tokens"] <= 4 for ev in done.values())


def test_past_the_kv_budget_k_shrinks_and_says_so(backend):
    events = list(backend.stream_many(MSGS, [Sampling(max_tokens=400)] * 4))
    assert events[0]["type"] == "note" and events[0]["text"].startswith("2 of 4 candidates")
    done, _ = _by_seq(events)
    assert sorted(done) == [0, 1, 2, 3]
    assert done[2]["finish_reason"] == done[3]["finish_reason"] == "error" and "1024" in done[3]["error"]
    assert done[0]["finish_reason"] in ("stop", "length") and done[1]["text"]
    events = list(backend.stream_many(MSGS, [Sampling(max_tokens=0)] * 2))  # 0: up to the context's end
    assert events[0]["text"].startswith("1 of 2 candidates") and _by_seq(events)[0][1]["finish_reason"] == "error"
    with pytest.raises(ModelError, match="does not fit"):
        fit_sequences(2, 1000, 10, 1000)
    with pytest.raises(ModelError, match=f"1 to {MAX_SEQS}"):
        fit_sequences(MAX_SEQS + 1, 10, 10, 10_000)


def test_the_engine_streams_k_sequences_as_one_request(tmp_path):
    engine = Engine(load_backend("smollm2-135m", n_ctx=512, data_dir=tmp_path))
    try:
        async def go():
            return [ev async for ev in engine.stream(MSGS, samplings=[Sampling(max_tokens=6)] * 3)]
        events = asyncio.run(go())
        assert [ev["type"] for ev in events].count("done") == 3 and events[-1]["type"] == "done"
        done = engine.generate_many(MSGS, [Sampling(max_tokens=5), Sampling(max_tokens=5, temperature=1.0, seed=3)])
        assert [ev["seq"] for ev in done] == [0, 1] and all("queue_s" in ev["figures"] for ev in done)
        assert not engine.busy
    finally:
        engine.close()
