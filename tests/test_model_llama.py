"""The in-process llama.cpp backend with the real SmolLM2-135M GGUF."""
from __future__ import annotations

import copy
import hashlib

import pytest

from local_model import ModelError, Sampling, load_backend
from local_model.gguf import read_metadata
from local_model.prefix_cache import TokenHistory, splice_prompt
from parts import assert_offload_matches_the_machine, smollm2_path


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    b = load_backend("smollm2-135m", data_dir=tmp_path_factory.mktemp("data"))
    yield b
    b.close()


WORDS = ("apple river stone cloud lamp forest window garden pencil bridge candle mirror rocket "
         "violin meadow harbor tunnel lantern compass feather").split()


def user_turn(i: int, key: str) -> str:
    body = " ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(90))
    return f"[{key}] Note {i}: {body}. Which word comes first?"


def test_streams_tokens_then_one_done_with_figures(backend):
    msgs = [{"role": "user", "content": "Write a short poem about the sea."}]
    events = list(backend.stream(msgs, Sampling(max_tokens=16)))
    tokens = [e for e in events if e["type"] == "token"]
    assert tokens and events[-1]["type"] == "done"
    assert sum(e["type"] == "done" for e in events) == 1
    done = events[-1]
    assert done["text"] == "".join(e["text"] for e in tokens)
    f = done["figures"]
    for k in ("ttft_s", "prompt_tokens", "cached_prompt_tokens", "prompt_eval_s", "completion_tokens",
              "decode_s", "tokens_per_s", "total_s"):
        assert k in f, k
    assert done["finish_reason"] == "length" and f["completion_tokens"] == 16
    assert f["prompt_tokens"] == backend.count_tokens(msgs)
    assert f["ttft_s"] > 0 and f["tokens_per_s"] > 0


def test_greedy_is_reproducible_and_stop_sequences_cut(backend):
    msgs = [{"role": "user", "content": "Count from 1 to 20, separated by commas."}]
    a = list(backend.stream(msgs, Sampling(max_tokens=30)))[-1]
    b = list(backend.stream(msgs, Sampling(max_tokens=30)))[-1]
    assert a["text"] == b["text"]
    # Stop on a piece of the text we know comes, and check it is cut and not shown.
    stop = a["text"][len(a["text"]) // 2:][:3]
    assert stop.strip()
    events = list(backend.stream(msgs, Sampling(max_tokens=30, stop=[stop])))
    done = events[-1]
    assert done["finish_reason"] == "stop"
    assert stop not in done["text"] and a["text"].startswith(done["text"])
    assert "".join(e["text"] for e in events if e["type"] == "token") == done["text"]


def test_manifest_fields(backend):
    m = backend.manifest
    path = smollm2_path()
    assert m["backend"] == "llama" and m["model"] == "smollm2-135m"
    assert m["file_name"] == path.name
    assert m["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert m["quant"] == "Q4_1"
    template = read_metadata(path)["tokenizer.chat_template"]
    assert m["chat_template_hash"] == hashlib.sha256(template.encode()).hexdigest()
    import llama_cpp
    assert m["llama_cpp_version"] == llama_cpp.__version__
    assert m["n_ctx"] == backend.n_ctx == 4096
    assert m["lora"] is None
    assert_offload_matches_the_machine(m["n_gpu_layers"], m["gpu"])  # layers on the GPU where there is one
    assert backend.supports_images is False


def test_should_stop_ends_within_a_token(backend):
    msgs = [{"role": "user", "content": "Tell a long story about a dragon."}]
    seen = []
    events = []
    for ev in backend.stream(msgs, Sampling(max_tokens=200), should_stop=lambda: len(seen) >= 3):
        events.append(ev)
        if ev["type"] == "token":
            seen.append(ev)
    done = events[-1]
    assert done["finish_reason"] == "cancelled"
    assert done["figures"]["completion_tokens"] <= 4
    assert done["text"] == "".join(e["text"] for e in seen)


def test_image_parts_become_placeholders_and_messages_stay_intact(backend):
    msgs = [{"role": "user", "content": [
        {"type": "text", "text": "What is in this picture?"},
        {"type": "image", "mime": "image/png", "data": "iVBORw0KGgo="},
    ]}]
    before = copy.deepcopy(msgs)
    assert "[image: image/png]" in backend.render(msgs)
    list(backend.stream(msgs, Sampling(max_tokens=4)))
    assert msgs == before


def test_growing_dialogs_reuse_the_kv_cache(backend):
    """Each turn evaluates only its new tokens (+32), also when two dialogs alternate."""
    dialogs: dict[str, list] = {"a": [], "b": []}
    for turn in range(5):
        for key in ("a", "b"):
            msgs = dialogs[key]
            text = user_turn(turn, key)
            msgs.append({"role": "user", "content": text})
            done = list(backend.stream(msgs, Sampling(max_tokens=24), cache_key=f"dialog-{key}"))[-1]
            f = done["figures"]
            new_tokens = backend.count_tokens(text)
            assert new_tokens >= 90
            if turn > 0 or key == "b":  # the very first prompt may start cold
                assert f["evaluated_prompt_tokens"] <= new_tokens + 32, (key, turn, f)
            assert f["cached_prompt_tokens"] + f["evaluated_prompt_tokens"] == f["prompt_tokens"]
            if turn > 0:
                assert f["kv"] == "restored"
            msgs.append({"role": "assistant", "content": done["text"]})


def test_a_changed_reply_rendering_still_reuses_the_prefix(backend):
    """A reply stored with its trailing whitespace trimmed still shares the prefix up to the change."""
    msgs = [{"role": "user", "content": user_turn(1, "trim")}]
    done = list(backend.stream(msgs, Sampling(max_tokens=20), cache_key="trim"))[-1]
    msgs += [{"role": "assistant", "content": done["text"].rstrip() + "  "},
             {"role": "user", "content": "Thanks. And the second word?"}]
    f = list(backend.stream(msgs, Sampling(max_tokens=4), cache_key="trim"))[-1]["figures"]
    assert f["evaluated_prompt_tokens"] <= backend.count_tokens("Thanks. And the second word?") + 32


def test_splice_keeps_generated_tokens_that_tokenize_differently(backend):
    """Tokens the model produced stay as they are even where BPE would now tokenize otherwise."""
    tok = lambda text, at_start=True: backend.llm.tokenize(text, add_bos=False, special=True)
    odd = tok(b"<|im_start|>assistant\nhel") + tok(b"lo wor") + tok(b"ld")  # canonical would merge
    canonical = tok(b"<|im_start|>assistant\nhello world")
    assert odd != canonical
    history = TokenHistory.build(odd, backend._piece)
    prompt = b"<|im_start|>assistant\nhello world<|im_end|>\n<|im_start|>user\nhi"
    spliced = splice_prompt(history, prompt, tok)
    assert spliced[: len(odd)] == odd
    assert backend.llm.detokenize(spliced, special=True) == prompt


def test_context_over_n_ctx_is_refused_clearly(tmp_path):
    small = load_backend("smollm2-135m", n_ctx=256, data_dir=tmp_path)
    try:
        msgs = [{"role": "user", "content": "word " * 400}]
        before = copy.deepcopy(msgs)
        with pytest.raises(ModelError) as e:
            list(small.stream(msgs, Sampling(max_tokens=8)))
        assert "256" in str(e.value) and "n_ctx" in str(e.value) and "tokens" in str(e.value)
        assert msgs == before
        # The backend still answers afterwards.
        ok = list(small.stream([{"role": "user", "content": "Hi"}], Sampling(max_tokens=4)))[-1]
        assert ok["type"] == "done" and ok["finish_reason"] in ("stop", "length")
    finally:
        small.close()


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError) as e:
        load_backend(str(tmp_path / "nope.gguf"))
    assert "does not exist" in str(e.value) and "python -m local_model install" in str(e.value)


def test_non_gguf_file_is_refused_before_llama_cpp(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_text("this is a text file, not a model\n" * 10)
    with pytest.raises(ModelError) as e:
        load_backend(str(bad))
    assert "not a GGUF" in str(e.value) and "python -m local_model install" in str(e.value)


def test_truncated_gguf_is_a_clear_error(tmp_path):
    bad = tmp_path / "truncated.gguf"
    bad.write_bytes(smollm2_path().read_bytes()[:4096])
    with pytest.raises(ModelError) as e:
        load_backend(str(bad))
    assert "corrupt" in str(e.value) or "truncated" in str(e.value)


def test_unknown_model_name_lists_the_known_ones():
    with pytest.raises(ModelError) as e:
        load_backend("no-such-model")
    assert "smollm2-135m" in str(e.value) and "qwen2.5-coder-1.5b" in str(e.value)


def test_missing_lora_adapter_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError) as e:
        load_backend("smollm2-135m", lora_path=str(tmp_path / "adapter.gguf"), data_dir=tmp_path)
    assert "LoRA adapter" in str(e.value) and "does not exist" in str(e.value)
