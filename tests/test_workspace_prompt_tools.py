"""`$`name`` values and `&`fn`` kernel tools in a prompt, answered by the real SmolLM2 engine with a real kernel.

SmolLM2's template has no tools, so the local backend describes them in the prompt's turn and reads
`<tool_call>` text; tool_choice "required" (or a grammar written here) makes it call, so the tests are
deterministic. The step loop, the kernel calls and the storage (reply_meta, the tool_steps table) are the real ones.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from execfeedback.traces import TraceStore
from execfeedback.workspace import tools as tools_module
from execfeedback.workspace.ask import KernelAccess, ask
from execfeedback.workspace.live import Live
from local_model import Engine, Sampling, load_backend
from kernelhelpers import pool_session
from parts import smollm2_path

KEY = "prompt-tools"
SETUP = (KEY, '''
import time
import pandas as pd
df = pd.DataFrame({"city": ["Oslo", "Lima", "Pune"], "temp_c": [4.5, 19.0, 31.25]})
x = 1234567
class SlowRepr:
    def __repr__(self):
        time.sleep(100)
slow = SlowRepr()

def scale(n: int) -> int:
    """Multiply n by ten."""
    return n * 10

def boom(n: int) -> float:
    """Divide one by n."""
    return 1 / n

def hang() -> None:
    """Never returns."""
    time.sleep(100)

def huge() -> str:
    """A very long text."""
    return "z" * 10_000_000
''')


@pytest.fixture(scope="module")
def session():
    yield from pool_session(SETUP)


@pytest.fixture(scope="module")
def engine():
    e = Engine(load_backend(str(smollm2_path()), n_ctx=4096))
    yield e
    e.close()


@pytest.fixture
def dialog(store):
    return store, store.create_dialog("tools")


def kernel(session) -> KernelAccess:
    async def key() -> str:
        return KEY
    return KernelAccess(session.pool, key)


def forced(call: dict) -> str:
    """A grammar that allows only this one call (every step: the loop runs to its bound)."""
    text = "<tool_call>\n" + json.dumps({"name": call["name"], "arguments": call["arguments"]}) + "\n</tool_call>"
    return "root ::= " + json.dumps(text) + "\n"


def answer(session, store, engine, mid, **kw):
    kw.setdefault("sampling", Sampling(max_tokens=40))
    return session.run(ask(store, engine, mid, kernel=kernel(session), **kw), timeout=240)


def test_a_prompt_with_a_value_and_a_tool_is_answered_with_the_value_seen_and_the_tool_called(session, engine, dialog):
    store, d = dialog
    m = store.add_message(d["id"], "prompt", "Which city is warmest in $`df`? Use &`scale` on its temperature.")
    res = answer(session, store, engine, m["id"], sampling=Sampling(max_tokens=60, tool_choice="required"))
    assert res.status == "done" and res.notes == []
    # The value, as read from the kernel, went into the prompt's own turn.
    steps = TraceStore(store).tool_steps(res.tools and store.get_message(m["id"])["reply_meta"]["request_id"],
                                         with_inputs=True)
    first_input = steps[0]["input_messages"]
    assert first_input[-1]["role"] == "user"
    assert "Pune" in first_input[-1]["content"] and "31.25" in first_input[-1]["content"]
    assert "(3, 2)" in first_input[-1]["content"] or "3 rows" in first_input[-1]["content"]
    assert "$`df`" not in first_input[-1]["content"]
    # The model called scale in the kernel, its result went back, and it answered after.
    call = res.tools["steps"][0]["calls"][0]
    assert call["name"] == "scale" and call["status"] == "ok"
    n = json.loads(call["arguments"])["n"]
    assert call["result"] == str(n * 10)
    assert [s["step"] for s in steps] == [0, 1]
    second = steps[1]["input_messages"]
    assert second[-2]["role"] == "assistant" and second[-2]["tool_calls"][0]["function"]["name"] == "scale"
    assert second[-1] == {"role": "tool", "tool_call_id": call["id"], "name": "scale", "content": str(n * 10)}
    assert steps[0]["tools"][0]["name"] == "scale" and steps[1]["calls"] == []
    # Stored with the message for the page: the values read, the offered tool and the call.
    meta = store.get_message(m["id"])["reply_meta"]
    assert meta["status"] == "done" and meta["refs"]["values"][0]["name"] == "df"
    assert meta["tools"]["steps"][0]["calls"][0]["result"] == str(n * 10)
    assert res.figures["tool_steps"] == 2 and res.figures["tool_calls"] == 1
    # The second step extends the first one's prompt: its KV prefix is reused.
    assert steps[1]["cached_prompt_tokens"] > steps[0]["prompt_tokens"] // 2


def test_unknown_names_and_a_hanging_repr_are_notes_not_failures(session, engine, dialog):
    store, d = dialog
    m = store.add_message(d["id"], "prompt", "Compare $`nosuch` with $`slow` and $`x`; call &`missing_fn`.")
    res = answer(session, store, engine, m["id"])
    assert res.status == "done" and res.reply
    joined = "\n".join(res.notes)
    assert "$`nosuch`" in joined and "not defined" in joined
    assert "$`slow`" in joined and "took over" in joined
    assert "&`missing_fn` is not offered" in joined
    assert "x" not in [n.split("`")[1] for n in res.notes]
    values = {v["name"]: v for v in store.get_message(m["id"])["reply_meta"]["refs"]["values"]}
    assert values["x"]["status"] == "ok" and "1234567" in values["x"]["text"]
    assert values["slow"]["status"] == "timeout" and values["nosuch"]["status"] == "missing"
    assert res.tools is None  # no function could be offered: a plain answer


def test_values_resolve_only_in_the_prompt_asked_so_the_cached_prefix_is_reused(session, engine, dialog):
    store, d = dialog
    first = store.add_message(d["id"], "prompt", "What is $`x`?")
    answer(session, store, engine, first["id"])
    second = store.add_message(d["id"], "prompt", "And $`x` plus one?")
    res = answer(session, store, engine, second["id"])
    assert res.status == "done"
    # The earlier prompt is in the context as written; only the one asked carries the value.
    from execfeedback.workspace.ask import context_for
    msgs = context_for(store, engine, store.get_message(second["id"]), 40)
    assert msgs[1]["content"] == "What is $`x`?"
    assert res.figures["cached_prompt_tokens"] > 0
    assert res.figures["cached_prompt_tokens"] >= res.figures["prompt_tokens"] - 80


def run_forced(session, store, engine, d, source, call, steps=1):
    m = store.add_message(d["id"], "prompt", source)
    res = answer(session, store, engine, m["id"], sampling=Sampling(max_tokens=60, grammar=forced(call)),
                 tool_steps=steps)
    return m, res


def test_a_tool_that_raises_or_returns_10_mb_answers_the_model_with_the_error_or_trimmed(session, engine, dialog):
    store, d = dialog
    _, res = run_forced(session, store, engine, d, "Use &`boom`.", {"name": "boom", "arguments": {"n": 0}})
    call = res.tools["steps"][0]["calls"][0]
    assert call["status"] == "error" and "ZeroDivisionError" in call["result"]
    # Bounded: with tool_steps 1, the second call is not run and the reply says so.
    assert res.tools["steps"][1]["calls"][0]["status"] == "not_run"
    assert any("tool_steps" in n for n in res.notes) and res.status == "done"

    _, res = run_forced(session, store, engine, d, "Use &`huge`.", {"name": "huge", "arguments": {}})
    call = res.tools["steps"][0]["calls"][0]
    assert call["status"] == "ok" and len(call["result"]) <= 5_000 and "zzz" in call["result"]


def test_a_hanging_tool_times_out_and_the_model_is_told(session, engine, dialog, monkeypatch):
    monkeypatch.setattr(tools_module, "TOOL_TIMEOUT_S", 2.0)
    store, d = dialog
    _, res = run_forced(session, store, engine, d, "Use &`hang`.", {"name": "hang", "arguments": {}})
    call = res.tools["steps"][0]["calls"][0]
    assert call["status"] == "timeout" and "2" in call["result"]
    # The kernel still answers afterwards.
    _, res = run_forced(session, store, engine, d, "Use &`scale`.", {"name": "scale", "arguments": {"n": 3}})
    assert res.tools["steps"][0]["calls"][0]["result"] == "30"


def test_calls_to_unknown_tools_or_with_bad_arguments_go_back_as_errors_and_steps_are_bounded(session, engine, dialog):
    store, d = dialog
    m, res = run_forced(session, store, engine, d, "Use &`scale`.", {"name": "nosuch", "arguments": {}}, steps=2)
    calls = [c for s in res.tools["steps"] for c in s["calls"]]
    assert [c["status"] for c in calls] == ["missing", "repeated", "not_run"]
    assert "no tool named `nosuch`" in calls[0]["result"] and "scale" in calls[0]["result"]
    assert res.figures["tool_steps"] == 3
    steps = TraceStore(store).tool_steps(message_id=m["id"], with_inputs=True)
    assert steps[1]["input_messages"][-1]["content"] == calls[0]["result"]
    assert "not run" in (store.get_message(m["id"])["reply_meta"]["tools"]["note"] or "")

    _, res = run_forced(session, store, engine, d, "Use &`scale`.", {"name": "scale", "arguments": {"m": 1}})
    call = res.tools["steps"][0]["calls"][0]
    assert call["status"] == "bad_arguments" and "n" in call["result"]


def test_zero_tool_steps_runs_no_call(session, engine, dialog):
    store, d = dialog
    _, res = run_forced(session, store, engine, d, "Use &`scale`.", {"name": "scale", "arguments": {"n": 1}}, steps=0)
    assert [c["status"] for s in res.tools["steps"] for c in s["calls"]] == ["not_run"]


def test_a_repeated_call_is_not_run_again(session, engine, dialog):
    store, d = dialog
    _, res = run_forced(session, store, engine, d, "Use &`scale`.", {"name": "scale", "arguments": {"n": 2}}, steps=2)
    calls = [c for s in res.tools["steps"] for c in s["calls"]]
    assert [c["status"] for c in calls] == ["ok", "repeated", "not_run"]
    assert calls[0]["result"] == "20" and "already called scale(n=2)" in calls[1]["result"] and "20" in calls[1]["result"]


CODER = Path("~/.loopbook/models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf").expanduser()


@pytest.mark.slow
def test_the_coder_model_decides_to_call_the_tool_and_answers_with_its_result(session, dialog):
    if not CODER.is_file():
        pytest.skip(f"slow: the coder model is not installed at {CODER}")
    store, d = dialog
    coder = Engine(load_backend(str(CODER), n_ctx=4096))
    try:
        m = store.add_message(d["id"], "prompt", "The table is $`df`. Call &`scale` on 7 and tell me what it returns.")
        res = answer(session, store, coder, m["id"], sampling=Sampling(max_tokens=120))  # tool_choice auto
    finally:
        coder.close()
    assert coder.manifest["model"].startswith("qwen2.5-coder")
    calls = [c for s in res.tools["steps"] for c in s["calls"]]
    assert calls and calls[0]["name"] == "scale" and json.loads(calls[0]["arguments"]) == {"n": 7}
    assert calls[0]["status"] == "ok" and calls[0]["result"] == "70"
    assert res.status == "done" and "70" in res.reply, res.reply


def test_stop_while_a_tool_runs_ends_the_loop_after_that_call(session, engine, dialog, monkeypatch):
    import asyncio

    monkeypatch.setattr(tools_module, "TOOL_TIMEOUT_S", 3.0)
    store, d = dialog
    m = store.add_message(d["id"], "prompt", "Use &`hang`.")
    stop = asyncio.Event()

    async def go():
        live = Live("reply-test")
        task = asyncio.create_task(ask(store, engine, m["id"], kernel=kernel(session), stop=stop, tool_steps=5, live=live,
                                       sampling=Sampling(max_tokens=40, grammar=forced({"name": "hang", "arguments": {}}))))
        # The call is written (its tokens streamed), so it runs now: Stop while it hangs.
        while "</tool_call>" not in "".join(e.get("text", "") for e in live.events if e["type"] == "token"):
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        assert session.pool.state(KEY) == "busy"
        stop.set()
        return await task

    res = session.run(go(), timeout=120)
    assert res.status == "cancelled"
    assert [c["status"] for s in res.tools["steps"] for c in s["calls"]] == ["timeout"]
    assert store.get_message(m["id"])["reply_meta"]["status"] == "cancelled"


def test_without_a_kernel_the_prompt_is_answered_with_notes(engine, dialog):
    import asyncio

    store, d = dialog
    m = store.add_message(d["id"], "prompt", "What is $`x`? Use &`scale`.")
    res = asyncio.run(ask(store, engine, m["id"], sampling=Sampling(max_tokens=8)))
    assert res.status == "done" and res.tools is None
    assert res.notes == ["$`x`: there is no kernel to read it from here",
                         "&`scale` is not offered as a tool: there is no kernel to read it from here"]
