"""Rows of each export format, built from one prepared trace (texts already scrubbed and trimmed).

A row comes as a RowSpec: `make(budget)` builds it, cutting observation turns to `budget` characters
when a token budget asks for it; `near` is the key that finds near-duplicates.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Iterator

from .hygiene import cut, digest, normalise_code, normalise_text
from .source import Trace, answer_text, is_good


@dataclass
class RowSpec:
    fmt: str
    make: Callable[[int | None], dict]
    near: bytes
    has_observations: bool = False
    correction: bool = False


def _m(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def code_key(tr: Trace, a: dict | None, said: str = "") -> str:
    """Normalised code of an attempt (memoised per trace), or of the answer text when there is no code."""
    if a is None:
        return "t:" + normalise_text(said)
    key = ("code", a["id"])
    if key not in tr.memo:
        code = a["code"] or ""
        tr.memo[key] = "c:" + _normalised_code(code) if code.strip() else "t:" + normalise_text(answer_text(a))
    return tr.memo[key]


@lru_cache(maxsize=4096)
def _normalised_code(code: str) -> str:
    # An eval at temperature 0 writes the same code for a task run after run: normalise it once.
    return normalise_code(code)


@lru_cache(maxsize=4096)
def _normalised_message(text: str) -> str:
    # Context messages recur across traces (the system prompt, an eval's task text): normalise each once.
    return normalise_text(text)


def prompt_key(tr: Trace) -> str:
    if "prompt" not in tr.memo:
        tr.memo["prompt"] = "\x1e".join(m["role"] + ":" + _normalised_message(m["content"]) for m in tr.prompt)
    return tr.memo["prompt"]


def conversation(tr: Trace, rounds: int, obs_role: str, budget: int | None = None) -> list[dict]:
    """The round-0 context and the first `rounds` (answer, observation) turns of the chain."""
    msgs = list(tr.prompt)
    for said, observation in tr.turns[:rounds]:
        msgs.append(_m("assistant", said))
        msgs.append(_m(obs_role, cut(observation, budget)[0] if budget else observation))
    return msgs


def _turn_keys(tr: Trace, rounds: int) -> list[str]:
    # Earlier turns compare as text (whitespace and case aside); the code that counts is the last one.
    if "turns" not in tr.memo:
        tr.memo["turns"] = [k for said, observation in tr.turns for k in (normalise_text(said),
                                                                           normalise_text(observation))]
    return tr.memo["turns"][:2 * rounds]


def sft_rows(tr: Trace, obs_role: str) -> Iterator[RowSpec]:
    a = tr.answer
    if a is None or a["depth"] is None or not answer_text(a).strip():
        return
    k = a["depth"]
    final = _m("assistant", answer_text(a))
    near = digest(prompt_key(tr), *_turn_keys(tr, k), code_key(tr, a))
    yield RowSpec("sft", lambda b: {"messages": conversation(tr, k, obs_role, b) + [final]}, near, k > 0)


def sft_final_rows(tr: Trace) -> Iterator[RowSpec]:
    a = tr.answer
    if a is None or not answer_text(a).strip():
        return
    row = {"messages": tr.prompt + [_m("assistant", answer_text(a))]}
    yield RowSpec("sft_final", lambda b: row, digest(prompt_key(tr), code_key(tr, a)))


def usable_negative(a: dict) -> bool:
    # An interrupted run says the person stopped it, not that the code was wrong; a human's failing
    # cell (round 0 of a Fix) is not a model answer.
    return (not is_good(a) and a["exec_status"] != "interrupted" and a["author"] == "model"
            and bool(answer_text(a).strip()))


def preference_rows(tr: Trace) -> Iterator[RowSpec]:
    a = tr.answer
    if a is None or not answer_text(a).strip():
        return
    chosen_text = answer_text(a)
    chosen = [_m("assistant", chosen_text)]
    for f in tr.attempts:
        if not usable_negative(f) or answer_text(f) == chosen_text:
            continue
        row = {"prompt": tr.prompt, "chosen": chosen, "rejected": [_m("assistant", answer_text(f))]}
        yield RowSpec("preference", lambda b, row=row: row, digest(prompt_key(tr), code_key(tr, a), code_key(tr, f)))


def kto_rows(tr: Trace, obs_role: str) -> Iterator[RowSpec]:
    for a in tr.attempts:
        said = answer_text(a)
        if a["exec_status"] == "interrupted" or not said.strip() or a["depth"] is None:
            continue
        r, label = a["depth"], is_good(a)
        completion = [_m("assistant", said)]
        near = digest(prompt_key(tr), *_turn_keys(tr, r), code_key(tr, a), str(label))
        yield RowSpec("kto", lambda b, r=r, completion=completion, label=label: {
            "prompt": conversation(tr, r, obs_role, b), "completion": completion, "label": label}, near, r > 0)


def _int(v) -> int:
    return -1 if v is None else int(v)


def _float(v) -> float:
    return -1.0 if v is None else float(v)


def _json_text(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, str):
        return v
    return json.dumps(v, ensure_ascii=False, sort_keys=True)


def traceback_text(v) -> str:
    if not v:
        return ""
    if isinstance(v, str):
        try:
            v = json.loads(v)
        except ValueError:
            return v
    return "\n".join(map(str, v)) if isinstance(v, list) else str(v)


def step(tr: Trace, a: dict) -> dict:
    hidden = a["hidden_passed"]
    return {
        "attempt_id": a["id"], "round": a["round"], "candidate": a["candidate"],
        "in_chain": any(c is a for c in tr.chain), "author": a["author"] or "model",
        "completion": a["completion"] or "", "code": a["code"] or "", "exec_status": a["exec_status"],
        "passed": bool(a["passed"]), "hidden": "" if hidden is None else ("passed" if hidden else "failed"),
        "ename": a["ename"] or "", "evalue": a["evalue"] or "", "traceback": a["traceback"],
        "stdout": a["stdout"] or "", "stderr": a["stderr"] or "", "checks": _json_text(a["checks"]),
        "observation": a["feedback"] or "", "prompt_tokens": _int(a["prompt_tokens"]),
        "cached_prompt_tokens": _int(a["cached_prompt_tokens"]), "completion_tokens": _int(a["completion_tokens"]),
        "ttft_s": _float(a["ttft_s"]), "decode_s": _float(a["decode_s"]), "exec_s": _float(a["exec_s"]),
        "sampling": _json_text(a["sampling"]),
    }


def trajectory_rows(tr: Trace, obs_role: str) -> Iterator[RowSpec]:
    t = tr.row
    last = tr.last
    tail = [_m("assistant", answer_text(last))] if answer_text(last).strip() else []
    k = len(tr.turns)
    base = {
        "trace_id": t["id"], "kind": t["kind"], "task_id": t["task_id"] or "", "task_source": t["task_source"] or "",
        "dialog_id": t["dialog_id"] or 0, "eval_run": t["eval_run"] or "", "model": t["model"] or "",
        "backend": t["backend"] or "", "created_at": t["created_at"] or "",
        "outcome": "solved" if tr.solved else "unsolved", "stop_reason": t["stop_reason"] or "",
        "rounds": t["rounds"] + 1, "n_attempts": len(tr.attempts), "manifest": t["manifest"], "sampling": t["sampling"],
        "prompt": tr.prompt,
    }
    steps = [step(tr, a) for a in tr.attempts]
    # The last code counts normalised; the other steps by status and text (whitespace and case aside).
    near = digest(prompt_key(tr), *_turn_keys(tr, k), code_key(tr, last),
                  *[f"{s['round']}:{s['exec_status']}:{normalise_text(s['completion'])}" for s in steps])
    yield RowSpec("trajectory", lambda b: {**base, "messages": conversation(tr, k, obs_role, b) + tail,
                                           "steps": steps}, near, k > 0)


def correction_rows(tr: Trace, group: list[dict], scrub: Callable[[str], str]) -> Iterator[RowSpec]:
    """One edited cell: the model's code (the first `before`) and the human's (the last `after`)."""
    model_code, human_code = scrub(group[0]["before"] or ""), scrub(group[-1]["after"] or "")
    diff = "".join(difflib.unified_diff(model_code.splitlines(True), human_code.splitlines(True),
                                        "model", "human"))
    answer = _m("assistant", f"```python\n{human_code.rstrip()}\n```")
    near = digest(prompt_key(tr), "c:" + normalise_code(model_code), "c:" + normalise_code(human_code))
    last = group[-1]
    row = {"edit_id": last["id"], "n_edits": len(group), "trace_id": tr.row["id"],
           "dialog_id": last["dialog_id"] or tr.row["dialog_id"] or 0, "message_id": last["message_id"],
           "model": tr.row["model"] or "", "created_at": last["created_at"] or "", "prompt": tr.prompt,
           "model_code": model_code, "human_code": human_code, "diff": diff}
    yield RowSpec("corrections", lambda b: row, near, correction=True)
    for fmt in ("sft", "sft_final"):
        yield RowSpec(fmt, lambda b: {"messages": tr.prompt + [answer]}, digest(prompt_key(tr), "c:" + normalise_code(
            human_code)), correction=True)


def is_trivial_edit(group: list[dict]) -> bool:
    """Only whitespace changed (or nothing)."""
    return (group[0]["before"] or "").split() == (group[-1]["after"] or "").split()
