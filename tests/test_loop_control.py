"""The loop's control logic, deterministic: the real SmolLM2 engine and real kernels, with each candidate's reply
forced by a llama.cpp grammar (Sampling.grammar, a GBNF literal), so each test fails when the logic it pins breaks.
The scripted replies are keyed (round, candidate)."""
from __future__ import annotations

import asyncio
import json

import pytest

from execfeedback.export.exporter import export_to_dir
from execfeedback.export.options import options_from_mapping
from execfeedback.loop.loop import LoopConfig, Task
from execfeedback.loop.select import shared_inputs
from execfeedback.settings import SETTINGS
from execfeedback.traces import TraceStore
from kernels import KernelPool
from local_model import Engine, Sampling, load_backend
from loophelpers import scripted


class LoopSession:
    def __init__(self):
        self.runner = asyncio.Runner()

    def run(self, coro, timeout=180):
        return self.runner.run(asyncio.wait_for(coro, timeout))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    s = LoopSession()
    s.engine = Engine(load_backend("smollm2-135m", data_dir=tmp_path_factory.mktemp("model")))
    s.pool = KernelPool(interrupt_grace_s=2.0)
    s.run(s.pool.start())
    yield s
    s.run(s.pool.shutdown_all())
    s.runner.close()
    s.engine.close()


def make(env, store, script, checks=None, key="k", **cfg):
    cfg.setdefault("sampling", Sampling(max_tokens=96))
    cfg.setdefault("repeat_resamples", 0)
    cfg.setdefault("retry_candidates", 1)  # one answer per feedback round, unless a test asks for the search
    cfg.setdefault("select_inputs", 6 if "inputs" in script else 0)  # the model's inputs only where scripted
    loop = scripted(script)(env.engine, env.pool, TraceStore(store), LoopConfig(**cfg))
    task = Task(kind="eval", messages=[{"role": "user", "content": "Write f."}], kernel_key=key, checks=checks,
                task_id="t")
    return loop, task


def run(env, loop, task, on_event=None):
    result = env.run(loop.run_to_end(task, on_event))
    trace = loop.traces.get_trace(result.trace_id)
    return result, trace


def count_requests(env, monkeypatch) -> list[int]:
    """The engine's requests as they come: how many sequences each one asked for."""
    calls = []
    orig = env.engine.stream

    def counting(*a, **kw):
        calls.append(len(kw.get("samplings") or [None]))
        return orig(*a, **kw)

    monkeypatch.setattr(env.engine, "stream", counting)
    return calls


CHECK = "assert f(2) == 4"


def test_candidates_come_from_one_batched_request_and_the_largest_group_wins(env, store, monkeypatch):
    script = {(0, 0): "def f(x):\n    return x * 3",      # greedy fails the visible check
              (0, 1): "def f(x):\n    return x + 2",      # passes, but behaves differently from 2 and 3
              (0, 2): "def f(x):\n    return x * 2",
              (0, 3): "def f(x):\n    return x + x"}
    loop, task = make(env, store, script, CHECK, key="sel1", candidates=4, rounds=0)
    calls = count_requests(env, monkeypatch)
    result, trace = run(env, loop, task)
    assert calls == [4]  # one request, four sequences
    assert result.status == "passed" and result.final.candidate == 2
    sel = {a["candidate"]: a["selection"] for a in trace["attempts"]}
    assert sel[2]["chosen"] and sel[2]["groups"] == [[2, 3], [1]]
    assert sel[0]["survived"] is False and "greedy dropped out" in sel[0]["reason"]
    assert trace["attempts"][0]["sampling"]["temperature"] == 0.0
    assert all(trace["attempts"][k]["sampling"]["temperature"] > 0 for k in (1, 2, 3))
    # the kernel holds the winner's definition, not the last candidate run
    res = env.run(env.pool.execute("sel1", "print(f(5))"))
    assert res.stdout.strip() == "10"


def test_greedy_stays_when_the_evidence_against_it_is_weak(env, store):
    script = {(0, 0): "def f(x):\n    return x * 2",
              (0, 1): "def f(x):\n    return x + 2",
              (0, 2): "def f(x):\n    return 2 + x"}
    loop, task = make(env, store, script, CHECK, key="sel2", candidates=3, rounds=0)
    result, trace = run(env, loop, task)
    assert result.final.candidate == 0
    sel = trace["attempts"][0]["selection"]
    assert sel["chosen"] and sel["groups"] == [[1, 2], [0]] and "greedy kept" in sel["reason"]


def test_no_visible_checks_agreement_on_output_still_selects(env, store):
    script = {(0, 0): "print(1)", (0, 1): "print(2)", (0, 2): "print(2)", (0, 3): "print(2)"}
    loop, task = make(env, store, script, None, key="sel3", candidates=4, rounds=0)
    result, trace = run(env, loop, task)
    assert result.final.candidate == 1  # 3 agree against greedy's 1: margin 2 reached
    assert trace["attempts"][1]["selection"]["groups"] == [[1, 2, 3], [0]]


def test_a_hanging_candidate_drops_out_without_taking_the_others_down(env, store):
    script = {(0, 0): "def f(x):\n    while x == 3: pass\n    return 4",  # passes f(2)==4, hangs on f(3)
              (0, 1): "def f(x):\n    return x * 2", (0, 2): "def f(x):\n    return x * 2"}
    loop, task = make(env, store, script, CHECK, key="sel4", candidates=3, rounds=0, exec_timeout=3.0)
    result, trace = run(env, loop, task)
    assert result.final.candidate == 1
    sel = {a["candidate"]: a["selection"] for a in trace["attempts"]}
    assert sel[0]["group"] is None and "probe" in sel[0]["why"]
    assert sel[1]["groups"] == [[1, 2]]


def test_repair_regenerates_from_the_task_the_failed_code_and_the_feedback(env, store):
    script = {(0, 0): "def f(x):\n    return x * 3", (1, 0): "def f(x):\n    return x * 2"}
    loop, task = make(env, store, script, CHECK, key="rep", rounds=2, retry="repair")
    result, trace = run(env, loop, task)
    assert result.status == "passed" and result.rounds == 1
    inp = trace["attempts"][1]["input_messages"]
    assert len(inp) == 1 and inp[0]["role"] == "user"
    assert "return x * 3" in inp[0]["content"] and "Write f." in inp[0]["content"]


def test_resample_asks_the_round_0_prompt_again_warmer(env, store):
    script = {(0, 0): "def f(x):\n    return x * 3", (1, 0): "def f(x):\n    return x * 2"}
    loop, task = make(env, store, script, CHECK, key="res", rounds=2, retry="resample")
    result, trace = run(env, loop, task)
    assert result.status == "passed"
    assert trace["attempts"][1]["input_messages"] == task.messages
    assert trace["attempts"][1]["sampling"]["temperature"] > 0


def test_the_same_error_twice_stops_for_no_progress(env, store):
    script = {(0, 0): "def f(x):\n    return x * 3", (1, 0): "def f(x):\n    return 3 * x",
              (2, 0): "def f(x):\n    return x * 2"}
    loop, task = make(env, store, script, CHECK, key="np", rounds=2, retry="refine")
    result, _ = run(env, loop, task)
    assert result.stop_reason == "no_progress" and result.rounds == 1


def test_a_batch_that_only_repeats_the_last_failure_stops_for_no_progress(env, store):
    script = {(0, 0): "def f(x):\n    return x * 3", **{(1, k): "def f(x):\n    return x * 3" for k in range(4)},
              **{(2, k): "def f(x):\n    return x * 2" for k in range(4)}}
    loop, task = make(env, store, script, CHECK, key="stale", rounds=2, retry="refine", retry_candidates=4)
    result, _ = run(env, loop, task)
    assert result.stop_reason == "no_progress" and result.rounds == 1


def test_stop_during_solve_ends_the_trace_stopped(env, store):
    long = "x = 1\n" + "\n".join(f"y{i} = {i}" for i in range(60))
    loop, task = make(env, store, {(0, 0): long}, None, key="stop", rounds=2, sampling=Sampling(max_tokens=600))

    def on_event(ev):
        if ev["type"] == "token":
            asyncio.get_running_loop().create_task(loop.stop())

    result, trace = run(env, loop, task, on_event)
    assert result.status == "stopped" and result.stop_reason == "stopped" and trace["n_attempts"] == 0


def test_a_reply_cut_off_at_the_token_limit_is_flagged(env, store):
    loop, task = make(env, store, {(0, 0): "def f(x):\n    return x * 2 + 0 + 0 + 0"}, CHECK, key="cut",
                      rounds=0, sampling=Sampling(max_tokens=6))
    result, trace = run(env, loop, task)
    a = trace["attempts"][0]
    assert a["finish_reason"] == "length" and not a["passed"]
    assert "cut off" in a["feedback"]


def test_a_name_error_is_fed_back_without_running(env, store, tmp_path):
    marker = tmp_path / "ran"
    code = f"open({str(marker)!r}, 'w').write('ran')\nprint(undefined_thing)"
    loop, task = make(env, store, {(0, 0): code}, None, key="static", rounds=0)
    result, trace = run(env, loop, task)
    a = trace["attempts"][0]
    assert a["exec_status"] == "error" and a["static"] is True and a["ename"] == "NameError"
    assert "undefined_thing" in a["feedback"] and not marker.exists()


def test_names_defined_by_earlier_cells_are_not_flagged(env, store):
    env.run(env.pool.execute("static2", "helper_value = 41"))
    loop, task = make(env, store, {(0, 0): "print(helper_value + 1)"}, None, key="static2", rounds=0)
    result, trace = run(env, loop, task)
    assert result.status == "passed" and trace["attempts"][0]["static"] is False


def test_more_candidates_than_the_context_holds_gives_fewer_and_a_note_in_the_trace(env, store):
    n_ctx = env.engine.backend.n_ctx
    script = {(0, k): "x = 1" for k in range(4)}
    loop, task = make(env, store, script, None, key="fit", candidates=4, rounds=0,
                      sampling=Sampling(max_tokens=n_ctx * 2 // 5))  # two replies fit, not four
    events = []
    result, trace = run(env, loop, task, events.append)
    notes = [e for e in events if e["type"] == "note"]
    assert len(notes) == 1 and "2 of 4 candidates" in notes[0]["text"]
    assert [a["candidate"] for a in trace["attempts"]] == [0, 1]
    assert all("2 of 4 candidates" in a["selection"]["note"] for a in trace["attempts"])


def test_default_solve_is_greedy_first_then_k_candidates_selected_after_a_failure(env, store, monkeypatch):
    defaults = {k: SETTINGS[k].default for k in ("rounds", "candidates", "retry_candidates", "retry_fresh", "retry",
                                                  "repeat_resamples", "select_inputs")}
    assert defaults["candidates"] == 1 and defaults["retry_candidates"] == 4 and defaults["select_inputs"] > 0
    assert defaults["retry_fresh"] == 2
    script = {"inputs": "```python\nf(7)\n```",
              (0, 0): "def f(x):\n    return x * 3",      # greedy fails the visible check
              (1, 0): "def f(x):\n    return x * 3 + 0",  # greedy again wrong after the feedback
              (1, 1): "def f(x):\n    return x + 2",
              (1, 2): "def f(x):\n    return x * 2",
              (1, 3): "def f(x):\n    return 2 * x"}
    loop, task = make(env, store, script, CHECK, key="dflt", **defaults)
    calls = count_requests(env, monkeypatch)
    events = []
    result, trace = run(env, loop, task, events.append)
    assert calls == [1, 4, 1]  # round 0: greedy alone; round 1: one batched request of four, then the inputs
    r1 = [a for a in trace["attempts"] if a["round"] == 1]
    assert [a["input_messages"] == task.messages for a in r1] == [False, False, True, True]  # 2 fresh samples
    assert [(a["round"], a["candidate"]) for a in trace["attempts"]] == [(0, 0), (1, 0), (1, 1), (1, 2), (1, 3)]
    assert "selection" not in trace["attempts"][0] or not trace["attempts"][0]["selection"]
    selected = [e for e in events if e["type"] == "selected"]
    assert len(selected) == 1 and selected[0]["round"] == 1
    sel = selected[0]["selection"]
    assert sel["winner"] == 2 and sel["groups"] == [[2, 3], [1]] and "greedy dropped out" in sel["reason"]
    assert result.status == "passed" and result.final.round == 1 and result.final.candidate == 2
    assert trace["config"]["retry_candidates"] == 4 and trace["config"]["candidates"] == 1


def test_fresh_samples_after_a_failure_come_from_the_task_without_the_failure(env, store, monkeypatch, tmp_path):
    script = {(0, 0): "def f(x):\n    return x * 3",
              (1, 0): "def f(x):\n    return x * 3 + 0",  # the feedback's greedy answer copies the failure
              (1, 1): "def f(x):\n    return x * 3 - 0",
              (1, 2): "def f(x):\n    return x * 2",      # fresh samples of the task: one of them passes
              (1, 3): "def f(x):\n    return x + 1"}
    loop, task = make(env, store, script, CHECK, key="fresh", rounds=1, retry="refine", retry_candidates=4,
                      retry_fresh=2)
    calls = count_requests(env, monkeypatch)
    result, trace = run(env, loop, task)
    assert calls == [1, 4]  # greedy; then one batch: the feedback's two and the task's two
    assert result.status == "passed" and result.final.round == 1 and result.final.candidate == 2
    att = {(a["round"], a["candidate"]): a for a in trace["attempts"]}
    for k in (2, 3):
        assert att[(1, k)]["input_messages"] == task.messages and att[(1, k)]["selection"]["fresh"] is True
        assert att[(1, k)]["sampling"]["temperature"] > 0
    for k in (0, 1):
        inp = att[(1, k)]["input_messages"]
        assert len(inp) == 3 and inp[1]["role"] == "assistant" and "x * 3" in inp[1]["content"]
        assert att[(1, k)]["selection"]["fresh"] is False
    assert trace["config"]["retry_fresh"] == 2
    # exported, the winner is an answer to the task itself: no feedback turn is put before it
    out = tmp_path / "out"
    export_to_dir(store, out, options_from_mapping({"format": "sft", "test_fraction": "0"}))
    rows = [json.loads(line) for line in (out / "sft.train.jsonl").read_text().splitlines()]
    assert [[m["role"] for m in r["messages"]] for r in rows] == [["user", "assistant"]]
    assert "x * 2" in rows[0]["messages"][-1]["content"]


def test_fresh_samples_never_replace_the_greedy_answer_to_the_feedback():
    cfg = LoopConfig(retry_candidates=4, retry_fresh=9)
    assert [cfg.fresh(0, 4), cfg.fresh(1, 4), cfg.fresh(1, 1)] == [0, 3, 0]
    assert LoopConfig(retry="resample", retry_fresh=2).fresh(1, 4) == 0  # every retry samples the task already


def test_a_greedy_answer_that_passes_costs_one_generation_by_default(env, store, monkeypatch):
    defaults = {k: SETTINGS[k].default for k in ("rounds", "candidates", "retry_candidates")}
    loop, task = make(env, store, {(0, 0): "def f(x):\n    return x * 2"}, CHECK, key="dflt2", **defaults)
    calls = []
    orig = env.engine.stream
    monkeypatch.setattr(env.engine, "stream", lambda *a, **kw: calls.append(kw.get("samplings")) or orig(*a, **kw))
    result, trace = run(env, loop, task)
    assert calls == [None] and result.status == "passed" and trace["n_attempts"] == 1


def sel_of(trace):
    return {a["candidate"]: a["selection"] for a in trace["attempts"]}


FAST_SLIP = {(0, 0): "def f(x):\n    return x * 2 if x < 5 else 0",  # right on the checks' inputs, wrong above 5
             (0, 1): "def f(x):\n    return x * 2", (0, 2): "def f(x):\n    return x + x",
             (0, 3): "def f(x):\n    return 2 * x"}


def test_inputs_the_model_writes_tell_apart_what_the_visible_checks_cannot(env, store):
    script = {**FAST_SLIP, "inputs": "```python\nf(10)\nassert f(12) == 99\nprint(f(-1))\ng(3)\n```"}
    loop, task = make(env, store, script, CHECK, key="inp1", candidates=4, rounds=0)
    events = []
    result, trace = run(env, loop, task, events.append)
    sel = next(e for e in events if e["type"] == "selected")["selection"]
    # its calls of f are used, never the output it predicted (99) nor a call of another name (g)
    assert sel["written_inputs"] == 3 and {"f(10)", "f(12)", "f(-1)"} <= set(sel["inputs"])
    assert not any("99" in i or i.startswith("g(") for i in sel["inputs"])
    assert sel["groups"] == [[1, 2, 3], [0]] and result.final.candidate == 1
    s = sel_of(trace)
    assert s[0]["inputs_tokens"] > 0 and all(s[k]["inputs_tokens"] == 0 for k in (1, 2, 3))


def test_a_model_that_writes_no_inputs_falls_back_to_the_visible_checks(env, store):
    script = {**FAST_SLIP, "inputs": "I would test it with a few numbers."}
    loop, task = make(env, store, script, CHECK, key="inp2", candidates=4, rounds=0)
    events = []
    result, trace = run(env, loop, task, events.append)
    sel = next(e for e in events if e["type"] == "selected")["selection"]
    assert sel["written_inputs"] == 0 and "no calls of f" in sel["inputs_why"]
    assert sel["inputs"] == shared_inputs(CHECK)  # the checks' calls and their mutations alone
    assert sel["groups"] == [[0, 1, 2, 3]] and result.final.candidate == 0


def test_a_candidate_that_kills_the_kernel_drops_out_and_the_others_are_still_grouped(env, store):
    script = {(0, 0): "def f(x):\n    return x * 2",
              (0, 1): "def f(x):\n    if x == 10:\n        import os; os._exit(1)\n    return x * 2",
              (0, 2): "def f(x):\n    return x + x", (0, 3): "def f(x):\n    return 2 * x",
              "inputs": "```python\nf(10)\n```"}
    loop, task = make(env, store, script, CHECK, key="inp3", candidates=4, rounds=0)
    result, trace = run(env, loop, task)
    s = sel_of(trace)
    assert s[1]["survived"] and s[1]["group"] is None and "probe died" in s[1]["why"]
    assert s[0]["groups"] == [[0, 2, 3]] and result.final.candidate == 0
    assert env.run(env.pool.execute("inp3", "print(f(10))")).stdout.strip() == "20"  # the winner's f, alive


def test_a_candidate_slow_where_the_others_return_drops_out_but_an_input_too_big_for_all_says_nothing(env, store):
    script = {(0, 0): "def f(x):\n    while x in (10, 11): pass\n    return x * 2",
              (0, 1): "def f(x):\n    while x == 11: pass\n    return x * 2",
              (0, 2): "def f(x):\n    while x == 11: pass\n    return x + x",
              "inputs": "```python\nf(10)\nf(11)\n```"}
    loop, task = make(env, store, script, CHECK, key="inp4", candidates=3, rounds=0, exec_timeout=20.0)
    result, trace = run(env, loop, task)
    s = sel_of(trace)
    assert s[0]["group"] is None and "probe timeout on f(10)" in s[0]["why"]
    assert s[1]["groups"] == [[1, 2]] and result.final.candidate == 1


def test_regenerate_retries_from_the_task_and_what_went_wrong_without_the_failed_code(env, store):
    failed = "def f(x):\n    total = x * 3\n    return total"
    script = {(0, 0): failed, (1, 0): "def f(x):\n    return x * 2"}
    loop, task = make(env, store, script, CHECK, key="regen", rounds=2, retry="regenerate")
    result, trace = run(env, loop, task)
    assert result.status == "passed" and result.rounds == 1
    inp = trace["attempts"][1]["input_messages"]
    assert len(inp) == 1 and inp[0]["role"] == "user" and inp[0]["content"].startswith("Write f.")
    text = inp[0]["content"]
    assert "assert f(2) == 4" in text and "`f(2)` returned 6, expected 4" in text  # the check, what it computed
    assert "total" not in text and "x * 3" not in text and "```python\n" not in text  # not the failed code


def test_a_failure_summary_leaves_out_the_lines_of_the_failed_code():
    from execfeedback.loop.feedback import failure_summary, syntax_error_obs
    code = "def f(x):\n    return [x for x in range(3) if x >\n"
    text = failure_summary(syntax_error_obs(code), code)
    assert "syntax error" in text and "range(3)" not in text
    obs = {"status": "error", "ename": "NameError", "evalue": "name 'helper_fn' is not defined",
           "traceback": ["Cell In[3], line 2", "----> 2     return helper_fn(x) + 1", "NameError: ..."]}
    text = failure_summary(obs, "def f(x):\n    return helper_fn(x) + 1")
    assert text == "It raised NameError: name 'helper_fn' is not defined"
