"""Solve and Fix in a dialog: turn cells into a loop Task, and land the loop's result back in the dialog."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from dialog import InvalidInput, Store
from dialog.context import ContextOptions, build_context
from dialog.render import stream_text
from local_model import Engine

from .ask import context_for, dialog_key
from ..loop.loop import LoopConfig, LoopResult, Task
from ..traces import TraceStore, spent
from ..settings import LOOP, check, keys


def visible_checks(cells: list[dict]) -> str | None:
    """Code cells marked as tests are the dialog's visible checks; a test cell that does not parse is refused."""
    tests = [c for c in cells if c["type"] == "code" and c.get("is_test") and not c.get("skipped")]
    for c in tests:
        try:
            compile(c["source"], f"<test cell {c['id']}>", "exec", dont_inherit=True)
        except (SyntaxError, ValueError) as e:
            raise InvalidInput(f"Test cell {c['id']} does not parse ({e}); fix it or unmark it as a test.") from None
    return "\n\n".join(c["source"] for c in tests) if tests else None


def loop_config(settings: dict, overrides: dict | None = None, base: LoopConfig | None = None) -> LoopConfig:
    """Loop settings: defaults, then the dialog's settings, then a request's overrides (None: not given), each
    checked against the settings table."""
    values = {k: settings[k] for k in keys(LOOP) if settings.get(k) is not None}
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    check(values, LOOP)
    return replace(base or LoopConfig(), **values)


def solve_task(store: Store, engine: Engine, message_id: Any, max_tokens: int, source: str | None = None) -> Task:
    """The loop's task for a prompt; `source`: the prompt's text as the model reads it ($`name` values resolved)."""
    m = store.get_message(message_id)
    if m["type"] != "prompt":
        raise InvalidInput(f"Message {m['id']} is a {m['type']} cell; Solve works on prompts.")
    if not m["source"].strip():
        raise InvalidInput("This prompt is empty: say what the code should do first.")
    cells = store.messages(m["dialog_id"])
    asked = m if source is None else {**m, "source": source}
    return Task(kind="solve", messages=context_for(store, engine, asked, max_tokens, cells=cells),
                kernel_key=dialog_key(m["dialog_id"]), checks=visible_checks(cells),
                cache_key=dialog_key(m["dialog_id"]), dialog_id=m["dialog_id"], message_id=m["id"],
                task_source="dialog")


def observation_of(cell: dict) -> dict | None:
    """The failure recorded on a code cell, shaped as the loop's observation; None if it did not fail."""
    meta = cell.get("output_meta") or {}
    outputs = cell.get("outputs") or []
    err = next((o for o in outputs if o.get("output_type") == "error"), None)
    status = meta.get("status") or ("error" if err else None)
    if status not in ("error", "timeout", "died"):
        return None
    obs = {"status": status, "stdout": stream_text(outputs, "stdout"), "stderr": stream_text(outputs, "stderr")}
    if err:
        obs.update(ename=err.get("ename"), evalue=err.get("evalue"), traceback=err.get("traceback") or [])
    return obs


def fix_task(store: Store, engine: Engine, message_id: Any) -> Task:
    m = store.get_message(message_id)
    if m["type"] != "code":
        raise InvalidInput(f"Message {m['id']} is a {m['type']} cell; Fix works on code cells.")
    obs = observation_of(m)
    if obs is None:
        raise InvalidInput("This cell did not fail: run it first, Fix starts from its error.")
    cells = store.messages(m["dialog_id"])
    settings = store.get_dialog(m["dialog_id"])["settings"]
    above = [c for c in cells if c["position"] < m["position"]]
    n_ctx = getattr(engine.backend, "n_ctx", None)
    opts = ContextOptions(system_prompt=settings.get("system_prompt") or None,
                          budget_tokens=(n_ctx - 1024 - 256) if n_ctx else None)
    messages = build_context(above, None, options=opts, count_tokens=engine.backend.count_tokens)
    return Task(kind="fix", messages=messages, kernel_key=dialog_key(m["dialog_id"]),
                checks=visible_checks([c for c in cells if c["id"] != m["id"]]), cache_key=dialog_key(m["dialog_id"]),
                dialog_id=m["dialog_id"], message_id=m["id"], task_source="dialog",
                human_attempt={"code": m["source"], "obs": obs})


def land(store: Store, traces: TraceStore, task: Task, result: LoopResult) -> int | None:
    """Put the final code in the dialog (a new cell under the prompt, or the fixed cell); returns its id."""
    final = result.final
    if final is None or final.code is None:
        if task.kind == "solve":
            store.update_message(task.message_id, reply=(final.completion if final else ""),
                                 reply_meta={"status": "done", "trace_id": result.trace_id, "solve": result.status})
        return None
    meta = {"status": final.obs.get("status"), "trace_id": result.trace_id, "message": None}
    status_to_meta = "ok" if final.passed else final.obs.get("status")
    with store.transaction():
        if task.kind == "solve":
            cell = store.add_message(task.dialog_id, "code", final.code, after=task.message_id, author="model",
                                     outputs=final.outputs, output_meta={**meta, "status": status_to_meta})
            store.update_message(task.message_id, reply=final.completion,
                                 reply_meta={"status": "done", "trace_id": result.trace_id, "solve": result.status,
                                             "code_message_id": cell["id"]})
        else:
            cell = store.update_message(task.message_id, source=final.code, author="model", outputs=final.outputs,
                                        output_meta={**meta, "status": status_to_meta})
        traces.set_code_message(result.trace_id, cell["id"])
    return cell["id"]


def note_edit(store: Store, traces: TraceStore, message: dict, new_source: str) -> None:
    """A human edit of code the model wrote is kept as a correction of the model's code."""
    if message["type"] != "code" or message.get("author") not in ("model", "human_edit"):
        return
    if new_source == message["source"]:
        return
    linked = traces.traces_for_message(message["id"])
    trace = next((t for t in reversed(linked) if t.get("code_message_id") == message["id"]), None)
    traces.record_edit(message["id"], message["source"], new_source, dialog_id=message["dialog_id"],
                       trace_id=trace["id"] if trace else None,
                       attempt_id=trace.get("final_attempt_id") if trace else None)
    store.update_message(message["id"], author="human_edit")


def summary(result: LoopResult, code_message_id: int | None) -> dict:
    """The API's answer for one solve."""
    return {"trace_id": result.trace_id, "status": result.status, "stop_reason": result.stop_reason,
            "rounds": result.rounds, "code_message_id": code_message_id,
            "spent": spent([a.record for a in result.attempts]),
            "attempts": [{k: a.record.get(k) for k in ("id", "round", "candidate", "exec_status", "passed", "ename",
                                                       "evalue", "code", "feedback", "author", "tokens_per_s",
                                                       "exec_s", "completion_tokens", "selection")} for a in result.attempts]}
