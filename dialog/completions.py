"""The completions table (migration 6): each ghost-text suggestion shown, its context and what became of it.

Outcomes: accepted (Tab took it), dropped (Esc, typing on, or the cursor left), edited (accepted, then the
inserted text was changed within the page's window: a few seconds or keystrokes). Only an accepted one can
still become edited; any other decision is final.
"""

from __future__ import annotations

import json
from typing import Any, Iterator

from .store import InvalidInput, NotFound, Store, _check_id, now

OUTCOMES = ("accepted", "edited", "dropped")


def add_completion(store: Store, *, dialog_id: int, message_id: int, cell_type: str, model: str | None, mode: str,
                   prefix: str, suffix: str, suggestion: str, figures: dict | None = None) -> int:
    """Log a suggestion that was shown; its outcome comes later (decide_completion). Returns its id."""
    with store.transaction() as db:
        cur = db.execute(
            "INSERT INTO completions (dialog_id, message_id, cell_type, model, mode, prefix, suffix, suggestion, "
            "figures, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (dialog_id, message_id, cell_type, model, mode, prefix, suffix, suggestion,
             json.dumps(figures or {}), now()))
        return int(cur.lastrowid)


def get_completion(store: Store, completion_id: Any) -> dict:
    cid = _check_id(completion_id, "completion")
    rows = store.rows("completions", "id = ?", (cid,))
    if not rows:
        raise NotFound(f"Completion {cid} not found.")
    row = rows[0]
    row["figures"] = json.loads(row["figures"] or "{}")
    return row


def decide_completion(store: Store, completion_id: Any, outcome: Any, final: Any = None, *,
                      dialog_id: int | None = None) -> dict:
    """Record what became of a suggestion: accepted, edited (with `final`, the text it became) or dropped."""
    if outcome not in OUTCOMES:
        raise InvalidInput(f"'outcome' must be one of {', '.join(OUTCOMES)}; got {str(outcome)[:40]!r}.")
    if final is not None and not isinstance(final, str):
        raise InvalidInput("'final' must be a string: the text the suggestion became.")
    row = get_completion(store, completion_id)
    if dialog_id is not None and row["dialog_id"] != dialog_id:
        raise NotFound(f"Completion {row['id']} is not in dialog {dialog_id}.")
    was = row["outcome"]
    if was is not None and not (was == "accepted" and outcome == "edited") and was != outcome:
        raise InvalidInput(f"Completion {row['id']} was {was} already; only an accepted one can become edited.")
    with store.transaction() as db:
        db.execute("UPDATE completions SET outcome = ?, final = ?, decided_at = ? WHERE id = ?",
                   (outcome, final if outcome == "edited" else None, now(), row["id"]))
    return get_completion(store, row["id"])


def iter_completions(conn, where: str = "1", params: tuple = ()) -> Iterator[dict]:
    """Rows of the completions table in id order, from any connection (the export reads a snapshot)."""
    cur = conn.execute(f"SELECT * FROM completions WHERE {where} ORDER BY id", params)
    names = [c[0] for c in cur.description]
    for r in cur:
        yield dict(zip(names, r))
