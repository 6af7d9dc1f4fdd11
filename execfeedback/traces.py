"""The trace store: solves, their attempts and human corrections, in the dialog store's SQLite file; open_store.
Any part of execfeedback may import it; it imports only dialog."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import sys
from typing import Any, Iterator

from sqlite_utils import Database

from dialog import InvalidInput, NotFound, Store, default_data_dir
from dialog.store import DB_NAME, now

TRACE_KINDS = ("solve", "fix", "eval")
EXEC_STATUSES = ("ok", "error", "timeout", "died", "interrupted", "no_code", "syntax_error", "check_failed")
STOP_REASONS = ("passed", "budget", "no_progress", "stopped", "no_code", "error")
ATTEMPT_FIELDS = (
    "round", "candidate", "dialog_id", "message_id", "task_id", "task_source", "completion", "finish_reason",
    "code", "extracted", "extract_reason", "exec_status", "passed", "ename", "evalue", "traceback", "stdout",
    "stderr", "stdout_chars", "stderr_chars", "truncated", "checks", "locals", "feedback", "hidden_passed",
    "ttft_s", "prompt_eval_s", "decode_s", "tokens_per_s", "exec_s", "prompt_tokens", "cached_prompt_tokens",
    "completion_tokens", "manifest", "sampling", "author", "static", "selection",
)
_JSON = {"traceback", "checks", "locals", "manifest", "sampling", "config", "summary", "selection"}


def open_store(data_dir: str | None) -> Store:
    """Open an existing store for a command (migrating an older one); never create one where there was none."""
    directory = default_data_dir(data_dir)
    if not (directory / DB_NAME).is_file():
        raise SystemExit(f"error: there is no Loopbook store in {directory} (no {DB_NAME}). Pass --data-dir with "
                         "the directory the app uses (LOOPBOOK_DATA_DIR, default ~/.loopbook).")
    try:
        store = Store(directory)
    except RuntimeError as e:  # a newer schema than this code knows
        raise SystemExit(f"error: {e}") from None
    except sqlite3.DatabaseError as e:
        raise SystemExit(f"error: {directory / DB_NAME} is not a readable Loopbook store ({e}).") from None
    if store.schema_from != store.schema_version:
        print(f"Upgraded the store from schema {store.schema_from} to {store.schema_version}.", file=sys.stderr)
    return store


def messages_hash(messages: list[dict]) -> str:
    return hashlib.sha256(json.dumps(messages, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def _encode(row: dict) -> dict:
    return {k: (json.dumps(v, ensure_ascii=False) if k in _JSON and v is not None and not isinstance(v, str) else v)
            for k, v in row.items()}


def _decode(row: dict) -> dict:
    row = dict(row)
    for k in _JSON & row.keys():
        if isinstance(row[k], str):
            row[k] = json.loads(row[k])
    for k in ("extracted", "passed", "truncated", "static"):
        if k in row and row[k] is not None:
            row[k] = bool(row[k])
    return row


def generated_tokens(attempt: dict) -> int:
    """Tokens an attempt generated, with its round's model-written test inputs (counted on the first candidate)."""
    return (attempt.get("completion_tokens") or 0) + ((attempt.get("selection") or {}).get("inputs_tokens") or 0)


def spent(attempts: list[dict]) -> dict:
    """What a trace's model attempts cost: generations, tokens generated and read, model and code seconds.
    A round's candidates decoded in one batch (they carry a selection record) read their prompt once and
    decode side by side, so they count as one generation lasting as long as the longest."""
    model = [a for a in attempts if a.get("author", "model") == "model"]
    generations: dict = {}
    for a in model:
        key = ("batch", a["round"]) if a.get("selection") else ("one", a.get("id") or id(a))
        generations.setdefault(key, []).append(a)
    read = model_s = 0.0
    for group in generations.values():
        first = group[0]
        read += max((first.get("prompt_tokens") or 0) - (first.get("cached_prompt_tokens") or 0), 0)
        model_s += (first.get("prompt_eval_s") or 0.0) + max((a.get("decode_s") or 0.0) for a in group)
    # a selection's model-written test inputs: one more generation
    inputs = sum(1 for a in model if (a.get("selection") or {}).get("inputs_tokens"))
    return {
        "attempts": len(model),
        "generations": len(generations) + inputs,
        "completion_tokens": sum(generated_tokens(a) for a in model),
        "prompt_tokens_read": int(read),  # evaluated, not served from the KV cache
        "model_s": round(model_s, 3),
        "exec_s": round(sum(a.get("exec_s") or 0.0 for a in model), 3),
    }


class TraceStore:
    """Writes each attempt in one transaction as it finishes, so a crash loses at most the one in flight."""

    spent = staticmethod(spent)  # the page reaches the trace store through its Workspace only

    def __init__(self, store: Store):
        self.store = store

    # -- traces --------------------------------------------------------------------------------

    def start_trace(self, kind: str, *, dialog_id: int | None = None, message_id: int | None = None,
                    task_id: str | None = None, task_source: str | None = None, eval_run_id: int | None = None,
                    model: str | None = None, backend: str | None = None, manifest: dict | None = None,
                    sampling: dict | None = None, config: dict | None = None) -> int:
        if kind not in TRACE_KINDS:
            raise InvalidInput(f"Trace kind must be one of {', '.join(TRACE_KINDS)}.")
        row = _encode({"kind": kind, "dialog_id": dialog_id, "message_id": message_id, "task_id": task_id,
                       "task_source": task_source, "eval_run_id": eval_run_id, "model": model, "backend": backend,
                       "manifest": manifest or {}, "sampling": sampling or {}, "config": config or {},
                       "status": "running", "created_at": now()})
        with self.store.transaction() as db:
            return db["traces"].insert(row).last_rowid

    def add_attempt(self, trace_id: int, input_messages: list[dict], **record: Any) -> int:
        """Store one attempt (and its exact model input, deduplicated by hash) in one transaction."""
        unknown = set(record) - set(ATTEMPT_FIELDS)
        if unknown:
            raise InvalidInput(f"Unknown attempt field(s): {', '.join(sorted(unknown))}.")
        if record.get("exec_status") not in EXEC_STATUSES:
            raise InvalidInput(f"exec_status must be one of {', '.join(EXEC_STATUSES)}.")
        digest = messages_hash(input_messages)
        row = _encode({**record, "trace_id": trace_id, "input_hash": digest, "created_at": now()})
        with self.store.transaction() as db:
            db["blobs"].insert({"hash": digest, "body": json.dumps(input_messages, ensure_ascii=False)}, ignore=True)
            attempt_id = db["attempts"].insert(row).last_rowid
            # Counters in SQL: they grow from what the row holds, with no copy read into Python first.
            db.execute("UPDATE traces SET n_attempts = n_attempts + 1, rounds = max(rounds, ?) WHERE id = ?",
                       (record.get("round", 0), trace_id))
            return attempt_id

    def set_selection(self, attempt_id: int, selection: dict) -> None:
        """Record, after the round's candidates all ran, the attempt's group and why the winner won."""
        with self.store.transaction() as db:
            db["attempts"].update(attempt_id, {"selection": json.dumps(selection, ensure_ascii=False)})

    def finish_trace(self, trace_id: int, *, status: str, stop_reason: str, final_attempt_id: int | None = None,
                     code_message_id: int | None = None, hidden_passed: bool | None = None) -> None:
        if stop_reason not in STOP_REASONS:
            raise InvalidInput(f"stop_reason must be one of {', '.join(STOP_REASONS)}.")
        with self.store.transaction() as db:
            db["traces"].update(trace_id, {
                "status": status, "stop_reason": stop_reason, "final_attempt_id": final_attempt_id,
                "code_message_id": code_message_id, "finished_at": now(),
                "hidden_passed": None if hidden_passed is None else int(hidden_passed)})

    def set_code_message(self, trace_id: int, message_id: int) -> None:
        with self.store.transaction() as db:
            db["traces"].update(trace_id, {"code_message_id": message_id})

    def get_trace(self, trace_id: Any, with_inputs: bool = True) -> dict:
        rows = self.store.rows("traces", "id = ?", (trace_id,))
        if not rows:
            raise NotFound(f"There is no trace {trace_id}.")
        trace = _decode(rows[0])
        trace["attempts"] = self.attempts(trace["id"], with_inputs=with_inputs)
        return trace

    def attempts(self, trace_id: int, with_inputs: bool = False) -> list[dict]:
        rows = [_decode(r) for r in self.store.rows("attempts", "trace_id = ?", (trace_id,),
                                                    order_by="round, candidate, id")]
        if with_inputs:
            for r in rows:
                r["input_messages"] = self.input_messages(r["input_hash"])
        return rows

    def input_messages(self, digest: str) -> list[dict]:
        rows = self.store.rows("blobs", "hash = ?", (digest,), select="body")
        return json.loads(rows[0]["body"]) if rows else []

    def traces_for_message(self, message_id: int) -> list[dict]:
        return [_decode(r) for r in self.store.rows("traces", "message_id = ? OR code_message_id = ?",
                                                    (message_id, message_id), order_by="id")]

    def iter_traces(self, where: str = "1", params: tuple = ()) -> Iterator[dict]:
        """Stream traces from a separate read cursor, for exports that must not hold everything in memory."""
        db = Database(self.store.reader())
        try:
            for row in db["traces"].rows_where(where, params, order_by="id"):
                yield _decode(row)
        finally:
            db.close()

    # -- tool steps: a prompt's tool loop (`&`fn``), one row per model step ---------------------------

    def add_tool_step(self, input_messages: list[dict], *, request_id: str, step: int, dialog_id: int | None = None,
                      message_id: int | None = None, tools: list[dict] | None = None, completion: str = "",
                      calls: list[dict] | None = None, finish_reason: str | None = None, note: str | None = None,
                      figures: dict | None = None, model: str | None = None, backend: str | None = None) -> int:
        """Store one step (its exact input deduplicated by hash, like an attempt's) in one transaction."""
        digest = messages_hash(input_messages)
        fig = figures or {}
        row = {"dialog_id": dialog_id, "message_id": message_id, "request_id": request_id, "step": step,
               "input_hash": digest, "tools": json.dumps(tools or [], ensure_ascii=False), "completion": completion,
               "calls": json.dumps(calls or [], ensure_ascii=False), "finish_reason": finish_reason, "note": note,
               "prompt_tokens": fig.get("prompt_tokens"), "cached_prompt_tokens": fig.get("cached_prompt_tokens"),
               "completion_tokens": fig.get("completion_tokens"), "model": model, "backend": backend,
               "created_at": now()}
        with self.store.transaction() as db:
            db["blobs"].insert({"hash": digest, "body": json.dumps(input_messages, ensure_ascii=False)}, ignore=True)
            return db["tool_steps"].insert(row).last_rowid

    def tool_steps(self, request_id: str | None = None, *, message_id: int | None = None,
                   with_inputs: bool = False) -> list[dict]:
        """The steps of one tool loop (by request id), or of every loop on a message, oldest first."""
        where, params = (("request_id = ?", (request_id,)) if request_id is not None
                         else ("message_id = ?", (message_id,)))
        rows = self.store.rows("tool_steps", where, params, order_by="id")
        for r in rows:
            r["tools"], r["calls"] = json.loads(r["tools"]), json.loads(r["calls"])
            if with_inputs:
                r["input_messages"] = self.input_messages(r["input_hash"])
        return rows

    def tool_request_ids(self) -> list[str]:
        """Every tool loop's request id, oldest first."""
        return [r["request_id"] for r in self.store.rows("tool_steps", "step = 0", (), select="request_id",
                                                          order_by="id")]

    # -- human corrections -----------------------------------------------------------------------

    def record_edit(self, message_id: int, before: str, after: str, *, dialog_id: int | None = None,
                    trace_id: int | None = None, attempt_id: int | None = None) -> int:
        with self.store.transaction() as db:
            return db["edits"].insert({"dialog_id": dialog_id, "message_id": message_id, "trace_id": trace_id,
                                       "attempt_id": attempt_id, "before": before, "after": after,
                                       "created_at": now()}).last_rowid

    def edits(self, message_id: int | None = None) -> list[dict]:
        if message_id is None:
            return self.store.rows("edits", order_by="id")
        return self.store.rows("edits", "message_id = ?", (message_id,), order_by="id")

    # -- eval runs -------------------------------------------------------------------------------

    def start_eval_run(self, name: str, *, problems_path: str | None = None, problems_sha256: str | None = None,
                       config: dict | None = None) -> dict:
        """Create the named run, or return it when it exists (an interrupted run resumes)."""
        existing = self.eval_run(name)
        if existing:
            return existing
        with self.store.transaction() as db:
            db["eval_runs"].insert({"name": name, "problems_path": problems_path, "problems_sha256": problems_sha256,
                                    "config": json.dumps(config or {}), "created_at": now()})
        return self.eval_run(name)

    def finish_eval_run(self, run_id: int, summary: dict, status: str = "done") -> None:
        with self.store.transaction() as db:
            db["eval_runs"].update(run_id, {"summary": json.dumps(summary), "status": status, "finished_at": now()})

    def eval_run(self, name: str) -> dict | None:
        rows = self.store.rows("eval_runs", "name = ?", (name,))
        return _decode(rows[0]) if rows else None
