"""Ghost text at the model level (local_model/ghost.py): the completer's own context on the real SmolLM2, the
tokens each completion reads, fill-in-the-middle prompts, the stop rules, and how it yields to the engine."""
from __future__ import annotations

import threading
from pathlib import Path

import pytest

from local_model import Engine, Sampling, load_backend
from local_model.ghost import (Fim, cut_suggestion, find_fim, ghost_complete, prompt_tokens, scope_for,
                               trim_start)

CODER = Path("~/.loopbook/models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf").expanduser()
SETUP = ("import math\n\n\ndef area(r):\n    \"\"\"The area of a circle of radius r.\"\"\"\n    return math.pi * r ** 2\n\n\n"
         "def circumference(r):\n    return ")
SUFFIX = "\n\n\nprint(area(2), circumference(2))\n"


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    b = load_backend("smollm2-135m", data_dir=tmp_path_factory.mktemp("data"))
    yield b
    b.close()


@pytest.fixture(scope="module")
def engine(backend):
    e = Engine(backend)
    yield e
    e.close()


def tokens(backend, text: str) -> int:
    return len(backend.llm.tokenize(text.encode(), add_bos=False, special=False))


# -- prompts, stops, trimming (pure) ----------------------------------------------------------------------

def test_fim_tokens_are_found_by_llama_cpp_or_by_their_spelling():
    vocab = {"<fim_prefix>": 1, "<fim_suffix>": 2, "<fim_middle>": 3}
    assert find_fim(vocab.get) == Fim(1, 2, 3)  # StarCoder's spelling
    assert find_fim({"<|fim_prefix|>": 7, "<|fim_suffix|>": 8, "<|fim_middle|>": 9}.get) == Fim(7, 8, 9)
    assert find_fim(vocab.get, (10, 11, 12)) == Fim(10, 11, 12)  # what the GGUF says comes first
    assert find_fim({"<fim_prefix>": 1, "<fim_suffix>": 2}.get) is None  # all three or none


def test_fim_prompt_is_prefix_suffix_middle_and_prefix_only_without_fim():
    fim = Fim(100, 101, 102)
    assert prompt_tokens([1, 2], [3, 4], fim) == [100, 1, 2, 101, 3, 4, 102]
    assert prompt_tokens([1, 2], [3, 4], None) == [1, 2]  # no FIM tokens: the text after the cursor is not read
    assert prompt_tokens([1, 2], [], None, bos=0) == [0, 1, 2]


def test_smollm2_has_no_fim_tokens_so_it_completes_the_prefix(backend):
    g = backend.ghost()
    assert g.fim is None and g.mode == "prefix"
    prompt, n_suffix = g.build("x = 1\ny = ", "\nprint(y)\n", 48)
    assert n_suffix == 0 and prompt == backend.llm.tokenize(b"x = 1\ny = ", add_bos=False, special=False)


def test_suggestions_stop_at_the_end_of_a_line_or_a_block():
    assert scope_for("x = ma") == "line"
    assert scope_for("def f(x):") == "block" and scope_for("def f(x):\n    ") == "block"
    assert scope_for("def f(x):", kind="text") == "line"
    assert cut_suggestion("th(1)\ny = 2", "line", "x = ma") == ("th(1)", True)
    assert cut_suggestion("th(1", "line", "x = ma") == ("th(1", False)
    body = "\n    return x + 1\n\nprint(f(2))"
    assert cut_suggestion(body, "block", "def f(x):") == ("\n    return x + 1", True)
    # At a blank line inside a body: the body's lines, up to the first line that dedents.
    assert cut_suggestion("y = 2\n    return y\nz = 3", "block", "    ") == ("y = 2\n    return y", True)
    assert cut_suggestion("\n    ret", "block", "def f(x):") == ("\n    ret", False)


def test_the_prefix_is_cut_at_steps_that_stay_put_while_typing_goes_on():
    text = "a" * 1000
    cut = trim_start(text, 400)
    assert len(cut) <= 400 and text.endswith(cut)
    assert len(trim_start(text + "bcd", 400)) == len(cut) + 3  # same start: the KV cells stay usable
    assert trim_start("short", 400) == "short"


# -- the completer on the real SmolLM2 --------------------------------------------------------------------

def test_each_completion_reads_only_what_was_typed_plus_the_suffix(engine, backend):
    first = ghost_complete(engine, SETUP, SUFFIX)
    assert first.status == "ok" and first.mode == "prefix"
    assert first.evaluated_prompt_tokens == first.prompt_tokens  # a fresh context reads all of it
    counts = []
    text = SETUP
    for typed in ("2 * math", ".pi * r", "  # the rim"):
        text += typed
        res = ghost_complete(engine, text, SUFFIX)
        assert res.status == "ok", res
        bound = tokens(backend, typed) + res.suffix_tokens + 32
        assert res.evaluated_prompt_tokens <= bound, (typed, res)
        assert res.cached_prompt_tokens >= first.prompt_tokens - 2
        counts.append(res.evaluated_prompt_tokens)
    # Deleting back to an earlier text reads (at most) its last token again.
    res = ghost_complete(engine, SETUP, SUFFIX)
    assert res.evaluated_prompt_tokens <= 2, res
    print("evaluated prompt tokens per completion:", [first.evaluated_prompt_tokens, *counts,
                                                      res.evaluated_prompt_tokens])


def test_a_huge_prefix_is_trimmed_to_fit_and_typing_after_it_still_reuses_the_cells(engine, backend):
    huge = "".join(f"value_{i} = {i} * {i}\n" for i in range(20_000)) + "total = "
    g = backend.ghost()
    res = ghost_complete(engine, huge, "")
    assert res.status == "ok" and res.prompt_tokens <= g.n_ctx - 48
    again = ghost_complete(engine, huge + "value_1 + ", "")
    assert again.status == "ok" and again.evaluated_prompt_tokens <= tokens(backend, "value_1 + ") + 32


def test_a_completion_while_the_engine_works_answers_busy_at_once(engine):
    started, release = threading.Event(), threading.Event()

    def slow_sink(ev):
        started.set()
        release.wait(30)

    rid = engine.submit([{"role": "user", "content": "Count to twenty."}], Sampling(max_tokens=64), None, None,
                        slow_sink)
    try:
        assert started.wait(30)
        res = ghost_complete(engine, "x = ", "")
        assert res.status == "busy" and res.text == "" and "answering" in res.message
    finally:
        release.set()
        engine.cancel(rid)


def test_an_ask_started_during_a_completion_is_served_as_if_there_were_none(tmp_path):
    """Two engines on the same GGUF do the same Asks; on one, a long completion runs when the second Ask comes.
    Its reply is the same text, the dialog's cached prefix is used as much, and the completion gave way."""
    turn1 = [{"role": "user", "content": "Name three rivers in Europe."}]

    def asks(with_ghost: bool):
        e = Engine(load_backend("smollm2-135m", data_dir=tmp_path))
        try:
            first = e.generate(turn1, Sampling(max_tokens=24), cache_key="d1")
            turn2 = turn1 + [{"role": "assistant", "content": first["text"]},
                             {"role": "user", "content": "Now three mountains."}]
            ghost, running = {}, threading.Event()
            if with_ghost:
                completer = e.backend.ghost()
                worker = threading.Thread(target=lambda: ghost.update(res=completer.complete(
                    "# a long list\n" + "".join(f"item_{i} = {i}\n" for i in range(40)), "", max_tokens=400,
                    scope="none", should_stop=lambda: e.busy or e.queue_depth > 0,
                    on_token=lambda text: running.set())))
                worker.start()
                assert running.wait(60), "the completion never started"
            second = e.generate(turn2, Sampling(max_tokens=24), cache_key="d1")
            if with_ghost:
                worker.join(30)
            return first, second, ghost.get("res")
        finally:
            e.close()

    plain = asks(False)
    with_ghost = asks(True)
    assert with_ghost[0]["text"] == plain[0]["text"]
    assert with_ghost[1]["text"] == plain[1]["text"]
    cached = with_ghost[1]["figures"]["cached_prompt_tokens"]
    assert cached > 0 and cached == plain[1]["figures"]["cached_prompt_tokens"]
    res = with_ghost[2]
    assert res is not None and res.status == "busy" and res.finish == "cancelled"
    assert res.completion_tokens < 400


# -- the coder model (fill-in-the-middle) ------------------------------------------------------------------

@pytest.mark.slow
def test_the_coder_model_fills_in_the_middle(tmp_path):
    if not CODER.is_file():
        pytest.skip(f"slow: the coder model is not installed at {CODER}")
    e = Engine(load_backend(str(CODER), data_dir=tmp_path))
    try:
        g = e.backend.ghost()
        assert g.fim is not None and g.mode == "fim"
        res = ghost_complete(e, "def add(a, b):\n    return ", "\n\n\nprint(add(2, 3))\n")
        assert res.status == "ok" and res.mode == "fim" and "a + b" in res.text.replace("b + a", "a + b"), res
        # Typing into the middle: the prefix's cells stay; the typed text and the suffix are read again.
        again = ghost_complete(e, "def add(a, b):\n    return a", "\n\n\nprint(add(2, 3))\n")
        bound = len(g.backend.llm.tokenize(b"a", add_bos=False, special=False)) + again.suffix_tokens + 32
        assert again.suffix_tokens > 0 and again.evaluated_prompt_tokens <= bound, again
        assert again.cached_prompt_tokens > 0
    finally:
        e.close()
