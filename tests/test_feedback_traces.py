import pytest

from dialog import InvalidInput, NotFound
from execfeedback.traces import TraceStore


def test_trace_with_attempts_roundtrip(store):
    ts = TraceStore(store)
    d = store.create_dialog("d")
    m = store.add_message(d["id"], "prompt", "write f")
    tid = ts.start_trace("solve", dialog_id=d["id"], message_id=m["id"], model="smollm2-135m", backend="llama",
                         manifest={"sha256": "abc"}, sampling={"temperature": 0})
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "write f"}]
    a0 = ts.add_attempt(tid, msgs, round=0, completion="```python\nf=1\n```", code="f=1", extracted=True,
                        exec_status="error", ename="NameError", evalue="x", traceback=["line"], feedback="fix it")
    a1 = ts.add_attempt(tid, msgs + [{"role": "user", "content": "fix it"}], round=1, code="f=2", extracted=True,
                        exec_status="ok", passed=True)
    ts.finish_trace(tid, status="passed", stop_reason="passed", final_attempt_id=a1)
    t = ts.get_trace(tid)
    assert t["status"] == "passed" and t["n_attempts"] == 2 and t["rounds"] == 1 and t["final_attempt_id"] == a1
    assert [a["id"] for a in t["attempts"]] == [a0, a1]
    assert t["attempts"][0]["traceback"] == ["line"] and t["attempts"][0]["input_messages"] == msgs
    assert t["attempts"][1]["passed"] is True and t["manifest"] == {"sha256": "abc"}
    assert ts.traces_for_message(m["id"])[0]["id"] == tid
    assert [r["id"] for r in ts.iter_traces()] == [tid]


def test_identical_inputs_are_stored_once(store):
    ts = TraceStore(store)
    tid = ts.start_trace("eval", task_id="p1")
    for k in range(3):
        ts.add_attempt(tid, [{"role": "user", "content": "same"}], round=0, candidate=k, exec_status="error")
    assert store.query("SELECT count(*) AS n FROM blobs")[0]["n"] == 1


def test_bad_records_are_refused_and_leave_nothing(store):
    ts = TraceStore(store)
    tid = ts.start_trace("eval")
    with pytest.raises(InvalidInput):
        ts.add_attempt(tid, [], round=0, exec_status="exploded")
    with pytest.raises(InvalidInput):
        ts.add_attempt(tid, [], round=0, exec_status="ok", colour="red")
    with pytest.raises(InvalidInput):
        ts.start_trace("dream")
    with pytest.raises(NotFound):
        ts.get_trace(999)
    assert ts.get_trace(tid)["n_attempts"] == 0


def test_eval_run_is_resumable_by_name(store):
    ts = TraceStore(store)
    run = ts.start_eval_run("nightly", problems_path="p.jsonl", config={"rounds": 3})
    assert ts.start_eval_run("nightly")["id"] == run["id"]
    ts.finish_eval_run(run["id"], {"n": 3})
    assert ts.eval_run("nightly")["summary"] == {"n": 3}


def test_edits_are_recorded(store):
    ts = TraceStore(store)
    ts.record_edit(5, "model code", "human code", dialog_id=1)
    assert ts.edits(5)[0]["after"] == "human code"
