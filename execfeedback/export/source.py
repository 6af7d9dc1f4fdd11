"""Reading traces for the export: filters as SQL, one trace at a time from a read-only snapshot.

A trace's conversation is rebuilt from the exact input of its last model turn: the loop's input for
round r is the round r-1 input + the assistant's answer + the feedback turn, so the last input ends
in r (answer, feedback) pairs after the round-0 context.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Iterator

from ..traces import messages_hash
from .split import task_key

AUTHORS = ("model", "human", "human_edit")
OUTCOMES = ("solved", "unsolved", "all")

# The first user request of a trace, for grouping traces into tasks (same expression in every pass).
REQUEST_SQL = ("(SELECT json_extract(b.body, '$[#-1].content') FROM attempts a0 JOIN blobs b ON b.hash = a0.input_hash"
               " WHERE a0.trace_id = t.id AND a0.round = 0 ORDER BY a0.candidate, a0.id LIMIT 1)")
TRACE_SQL = ("SELECT t.*, e.name AS eval_run, {request} AS request FROM traces t"
             " LEFT JOIN eval_runs e ON e.id = t.eval_run_id WHERE {where} ORDER BY t.id")
GOOD_SQL = "(a.passed = 1 AND (a.hidden_passed IS NULL OR a.hidden_passed = 1))"
BASE_ATTEMPT_COLUMNS = ("id", "round", "candidate", "input_hash", "completion", "code", "exec_status", "passed",
                        "hidden_passed", "ename", "feedback", "author")
DETAIL_ATTEMPT_COLUMNS = ("evalue", "traceback", "stdout", "stderr", "checks", "prompt_tokens",
                          "cached_prompt_tokens", "completion_tokens", "ttft_s", "decode_s", "exec_s", "sampling")


class FilterError(ValueError):
    """A filter value the store does not know; the message lists the values it does know."""


@dataclass
class Filters:
    outcome: str = "all"
    min_rounds: int | None = None
    max_rounds: int | None = None
    models: tuple[str, ...] = ()
    backends: tuple[str, ...] = ()
    dialogs: tuple[int, ...] = ()
    eval_runs: tuple[str, ...] = ()
    since: str | None = None
    until: str | None = None
    authors: tuple[str, ...] = ()
    include_unfinished: bool = False

    def where(self, *, solved_only: bool = False) -> tuple[str, list]:
        """The SQL condition on `traces t` (and its parameters) for every filter but the author."""
        clauses, params = ["1"], []
        if not self.include_unfinished:
            clauses.append("t.finished_at IS NOT NULL")
        outcome = "solved" if solved_only and self.outcome == "all" else self.outcome
        if outcome == "solved":
            clauses.append(f"EXISTS (SELECT 1 FROM attempts a WHERE a.trace_id = t.id AND {GOOD_SQL})")
        elif outcome == "unsolved":
            clauses.append(f"NOT EXISTS (SELECT 1 FROM attempts a WHERE a.trace_id = t.id AND {GOOD_SQL})")
        if self.min_rounds is not None:
            clauses.append("t.rounds + 1 >= ?")
            params.append(self.min_rounds)
        if self.max_rounds is not None:
            clauses.append("t.rounds + 1 <= ?")
            params.append(self.max_rounds)
        for column, values in (("t.model", self.models), ("t.backend", self.backends), ("t.dialog_id", self.dialogs),
                               ("e.name", self.eval_runs)):
            if values:
                clauses.append(f"{column} IN ({', '.join('?' * len(values))})")
                params.extend(values)
        if self.since:
            clauses.append("t.created_at >= ?")
            params.append(self.since)
        if self.until:
            clauses.append("t.created_at < ?")
            params.append(self.until)
        return " AND ".join(clauses), params

    def described(self) -> list[str]:
        """The filters in force, as short phrases for the card."""
        out = [f"outcome: {self.outcome}"]
        if self.min_rounds is not None or self.max_rounds is not None:
            out.append(f"rounds: {self.min_rounds or 1} to {self.max_rounds if self.max_rounds is not None else 'any'}")
        for label, values in (("model", self.models), ("backend", self.backends), ("dialog", self.dialogs),
                              ("eval run", self.eval_runs), ("author", self.authors)):
            if values:
                out.append(f"{label}: {', '.join(map(str, values))}")
        if self.since:
            out.append(f"since: {self.since}")
        if self.until:
            out.append(f"until (before): {self.until}")
        out.append("unfinished traces: " + ("included" if self.include_unfinished else "left out"))
        return out


def parse_when(value: str, *, end: bool = False, flag: str = "--since") -> str:
    """A date (YYYY-MM-DD) or ISO time as the store writes it (UTC); an end date includes its whole day."""
    text = str(value).strip()
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise FilterError(f"{flag} must be a date like 2025-01-31 or an ISO time like 2025-01-31T14:00; "
                          f"got {value!r}.") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    if end and len(text) == 10:
        when += timedelta(days=1)
    return when.astimezone(timezone.utc).isoformat(timespec="milliseconds")


def _listing(values: list, limit: int = 20) -> str:
    shown = ", ".join(str(v) for v in values[:limit])
    more = f" and {len(values) - limit} more" if len(values) > limit else ""
    return (shown + more) if values else "none"


def check_known(conn: sqlite3.Connection, filters: Filters, exclude_eval_runs: tuple[str, ...] = ()) -> None:
    """Refuse filter values the store has never seen, listing the ones it has."""
    def distinct(sql: str) -> list:
        return [r[0] for r in conn.execute(sql)]

    for flag, values, sql in (
        ("--model", filters.models, "SELECT DISTINCT model FROM traces WHERE model IS NOT NULL ORDER BY model"),
        ("--backend", filters.backends, "SELECT DISTINCT backend FROM traces WHERE backend IS NOT NULL ORDER BY 1"),
    ):
        known = distinct(sql)
        unknown = [v for v in values if v not in known]
        if unknown:
            raise FilterError(f"{flag} {', '.join(unknown)}: no trace has that value. Known: {_listing(known)}.")
    runs = distinct("SELECT name FROM eval_runs ORDER BY created_at, id")
    for flag, values in (("--eval-run", filters.eval_runs), ("--exclude-eval-run", exclude_eval_runs)):
        unknown = [v for v in values if v not in runs]
        if unknown:
            raise FilterError(f"{flag} {', '.join(unknown)}: there is no eval run of that name. "
                              f"Eval runs in this store: {_listing(runs)}.")
    if filters.dialogs:
        rows = conn.execute("SELECT id, title FROM dialogs ORDER BY id").fetchall()
        known_ids = {r[0] for r in rows}
        unknown = [d for d in filters.dialogs if d not in known_ids]
        if unknown:
            listing = _listing([f"{r[0]} ({r[1]})" for r in rows])
            raise FilterError(f"--dialog {', '.join(map(str, unknown))}: there is no dialog with that id. "
                              f"Dialogs: {listing}.")


# -- one trace -------------------------------------------------------------------------------------

def is_good(a: dict) -> bool:
    """Passed its visible checks, and the hidden tests too when they were run."""
    return bool(a["passed"]) and a["hidden_passed"] != 0


def answer_text(a: dict) -> str:
    """What the attempt answered: the raw completion, or the code fenced when a human typed it."""
    completion = a.get("completion") or ""
    if completion.strip():
        return completion
    code = a.get("code") or ""
    return f"```python\n{code.rstrip()}\n```" if code.strip() else ""


def content_text(content) -> str:
    """Message content as text: image parts become a short note (trainers take strings)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for p in content:
            if isinstance(p, dict) and p.get("type") == "text":
                parts.append(str(p.get("text", "")))
            elif isinstance(p, dict):
                parts.append(f"[{p.get('type', 'part')} omitted]")
            else:
                parts.append(str(p))
        return "\n".join(parts)
    return "" if content is None else str(content)


def clean_messages(raw) -> list[dict]:
    """Role and text content only, with same-role neighbours merged so roles alternate."""
    out: list[dict] = []
    for m in raw if isinstance(raw, list) else []:
        if not isinstance(m, dict):
            continue
        role, text = str(m.get("role") or "user"), content_text(m.get("content"))
        if out and out[-1]["role"] == role and role != "system":
            out[-1] = {"role": role, "content": out[-1]["content"] + "\n\n" + text}
        else:
            out.append({"role": role, "content": text})
    return out


@dataclass
class Trace:
    """One trace, ready to turn into rows: the round-0 context, the chain of turns, all attempts."""

    row: dict
    attempts: list[dict]
    prompt: list[dict]
    turns: list[list[str]]            # [answer, observation] per round before the last
    chain: list[dict | None]          # the attempt the conversation went on from, per round
    last: dict                        # the attempt of the last round in the chain
    answer: dict | None               # the passing attempt, when solved
    task: str
    rebuilt: bool = False             # the input was not base + turns: only the base input is used
    memo: dict = field(default_factory=dict)

    @property
    def solved(self) -> bool:
        return self.answer is not None

    @property
    def author(self) -> str:
        return (self.answer or self.last)["author"] or "model"


class Source:
    """A read-only snapshot of the store, streamed one trace at a time."""

    def __init__(self, conn: sqlite3.Connection, *, details: bool = True, request_sql: bool = False):
        self.conn = conn
        # The request text from SQL costs a JSON parse per trace; it is needed only where a pass over
        # every trace must agree with the main pass (splits by dialog). Otherwise it comes from the prompt.
        self._request = REQUEST_SQL if request_sql else "NULL"
        conn.row_factory = None  # plain tuples, zipped into dicts here: several times faster than sqlite3.Row
        # One read transaction: every pass sees the same traces even while the app keeps writing.
        conn.execute("BEGIN")
        cols = self._attempt_columns = BASE_ATTEMPT_COLUMNS + (DETAIL_ATTEMPT_COLUMNS if details else ())
        self._attempts_sql = f"SELECT {', '.join(cols)} FROM attempts WHERE trace_id = ? ORDER BY round, candidate, id"

    def close(self) -> None:
        try:
            self.conn.execute("COMMIT")
        except sqlite3.Error:
            pass
        self.conn.close()

    def count(self, sql: str, params=()) -> int:
        return self.conn.execute(sql, params).fetchone()[0]

    def trace_rows(self, where: str, params: list) -> Iterator[dict]:
        sql = TRACE_SQL.format(request=self._request, where=where)
        cur = self.conn.execute(sql, params)
        cols = [d[0] for d in cur.description]
        for r in cur:
            yield dict(zip(cols, r))

    def count_traces(self, where: str, params: list) -> int:
        return self.count(f"SELECT count(*) FROM traces t LEFT JOIN eval_runs e ON e.id = t.eval_run_id WHERE {where}",
                          params)

    def task_links(self) -> Iterator[tuple[int | None, str]]:
        """(dialog, task) of every trace in the store, for splits by dialog."""
        sql = f"SELECT t.id, t.dialog_id, t.task_id, {REQUEST_SQL} AS request FROM traces t"
        for tid, dialog_id, task_id, request in self.conn.execute(sql):
            yield dialog_id, task_key(task_id, request, tid)

    def eval_run_tasks(self, names: tuple[str, ...]) -> set[str]:
        if not names:
            return set()
        sql = (f"SELECT t.id, t.task_id, {REQUEST_SQL} AS request FROM traces t JOIN eval_runs e "
               f"ON e.id = t.eval_run_id WHERE e.name IN ({', '.join('?' * len(names))})")
        return {task_key(task_id, request, tid) for tid, task_id, request in self.conn.execute(sql, names)}

    def _raw(self, digest: str) -> list:
        row = self.conn.execute("SELECT body FROM blobs WHERE hash = ?", (digest,)).fetchone()
        try:
            raw = json.loads(row[0]) if row else []
        except ValueError:
            return []
        return raw if isinstance(raw, list) else []

    def load(self, trow: dict) -> Trace | None:
        cols = self._attempt_columns
        attempts = [dict(zip(cols, r)) for r in self.conn.execute(self._attempts_sql, (trow["id"],))]
        if not attempts:
            return None
        by_id = {a["id"]: a for a in attempts}
        good = [a for a in attempts if is_good(a)]
        final = by_id.get(trow["final_attempt_id"])
        answer = (final if final in good else good[0]) if good else None
        last_round = max(a["round"] for a in attempts)
        if answer is not None:
            last = answer
        elif final is not None and final["round"] == last_round:
            last = final
        else:
            last = [a for a in attempts if a["round"] == last_round][-1]
        # The model's first input: a Fix trace starts with the human's failing attempt, whose input
        # the model never saw as such.
        base = next((a for a in attempts if a["author"] == "model"), attempts[0])
        h0 = base["input_hash"]
        raw = self._raw(last["input_hash"])
        d = 0 if last["input_hash"] == h0 else last["round"] - base["round"]
        verified = d == 0
        if d > 0 and len(raw) > 2 * d:
            tail = raw[len(raw) - 2 * d:]
            # The input must be the base input plus d (answer, feedback) pairs, checked by hash.
            verified = (all(isinstance(m, dict) and m.get("role") == ("assistant", "user")[i % 2]
                            for i, m in enumerate(tail)) and messages_hash(raw[:len(raw) - 2 * d]) == h0)
        if verified:
            prompt = clean_messages(raw[:len(raw) - 2 * d])
            turns = [[content_text(tail[2 * i].get("content")), content_text(tail[2 * i + 1].get("content"))]
                     for i in range(d)] if d else []
        else:
            # Not a chain this code knows how to read: keep only what is certain, the base input.
            prompt, turns = clean_messages(self._raw(h0)), []
        if not prompt or prompt[-1]["role"] != "user":
            return None  # no input stored (or one that asks nothing): no row could be built from it
        for a in attempts:
            if a["input_hash"] == h0:
                a["depth"] = 0
            elif verified and 0 < a["round"] - base["round"] <= d and a["author"] == "model":
                a["depth"] = a["round"] - base["round"]
            else:
                a["depth"] = None  # its input is not base + chain turns: no row depends on it
        chain: list[dict | None] = []
        for i, (said, observation) in enumerate(turns):
            in_round = [a for a in attempts if a["depth"] == i and a["round"] == base["round"] + i]
            pick = next((a for a in in_round if answer_text(a) == said), None) or next(
                (a for a in in_round if a["feedback"] and a["feedback"] == observation), None)
            chain.append(pick)
        chain.append(last)
        request = trow.get("request") or (prompt[-1]["content"] if prompt else None)
        return Trace(row=trow, attempts=attempts, prompt=prompt, turns=turns, chain=chain, last=last, answer=answer,
                     task=task_key(trow.get("task_id"), request, trow["id"]), rebuilt=not verified)

    def load_by_id(self, trace_id: int, where: str, params: list) -> Trace | None:
        sql = TRACE_SQL.format(request=self._request, where=f"t.id = ? AND {where}")
        cur = self.conn.execute(sql, [trace_id, *params])
        row = cur.fetchone()
        return self.load(dict(zip([d[0] for d in cur.description], row))) if row else None

    def edit_groups(self) -> Iterator[list[dict]]:
        """Edits per edited cell, oldest first (the first `before` is what the model wrote)."""
        group: list[dict] = []
        cur = self.conn.execute("SELECT * FROM edits ORDER BY message_id, id")
        cols = [d[0] for d in cur.description]
        for r in cur:
            r = dict(zip(cols, r))
            if group and group[-1]["message_id"] != r["message_id"]:
                yield group
                group = []
            group.append(r)
        if group:
            yield group

    def trace_for_edits(self, group: list[dict]) -> int | None:
        for e in reversed(group):
            if e["trace_id"]:
                return e["trace_id"]
        mid = group[0]["message_id"]
        row = self.conn.execute("SELECT id FROM traces WHERE code_message_id = ? OR message_id = ? ORDER BY id DESC "
                                "LIMIT 1", (mid, mid)).fetchone()
        return row[0] if row else None
