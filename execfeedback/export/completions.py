"""Rows of the `completions` format, from the store's completions table (the editor's ghost text, migration 6).

- kind "fim": one row per accepted suggestion: the text before the cursor (prefix), after it (suffix), and the
  middle the human took (chosen). Edited ones (taken, then changed at once) and dropped ones make no FIM row.
- kind "preference": a dropped suggestion against what the human wrote instead at the same place: the first
  suggestion accepted later in the same cell, with the same suffix, whose prefix extends the dropped one's
  prefix. chosen = what was typed in between, then the accepted suggestion; rejected = the dropped one.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator

MAX_TYPED_BETWEEN = 400  # characters typed between a dropped suggestion and the accepted one; farther is another place


def completion_rows(rows: Iterable[dict], scrub: Callable[[str], str]) -> Iterator[dict]:
    """FIM and preference rows, in the table's order; `rows` come in id order."""
    pending: dict[int | None, list[dict]] = {}  # dropped suggestions waiting for an accepted one, per cell
    for r in rows:
        cell = r["message_id"]
        if r["outcome"] == "dropped":
            pending.setdefault(cell, []).append(r)
            continue
        if r["outcome"] != "accepted":
            continue
        yield _row("fim", r, r, None, r["suggestion"], scrub)
        left = []
        for d in pending.get(cell, []):
            typed = r["prefix"][len(d["prefix"]):]
            if (d["suffix"] == r["suffix"] and r["prefix"].startswith(d["prefix"]) and len(typed) <= MAX_TYPED_BETWEEN
                    and (typed + r["suggestion"]).strip() and (typed + r["suggestion"]).strip() != d["suggestion"].strip()):
                yield _row("preference", d, r, d, typed + r["suggestion"], scrub)
            elif not r["prefix"].startswith(d["prefix"]):
                continue  # the text changed before it: it can no longer pair
            else:
                left.append(d)
        pending[cell] = left


def _row(kind: str, at: dict, accepted: dict, rejected: dict | None, chosen: str, scrub) -> dict:
    return {"kind": kind, "completion_id": accepted["id"], "rejected_id": rejected["id"] if rejected else -1,
            "dialog_id": at["dialog_id"] or 0, "message_id": at["message_id"] or 0,
            "cell_type": at["cell_type"] or "", "model": accepted["model"] or "", "mode": at["mode"],
            "created_at": accepted["created_at"], "prefix": scrub(at["prefix"]), "suffix": scrub(at["suffix"]),
            "chosen": scrub(chosen), "rejected": scrub(rejected["suggestion"]) if rejected else ""}
