"""Ghost text in a dialog: the resident model's completion at a cell's cursor, logged with what became of it.

The page (a pause in typing, or Alt+.) and the API call `ghost`; the page reports the outcome with `decide`.
The context is the cells above (skipped ones left out), then the cell's text before the cursor; the text
after it is the suffix (read where the model has fill-in-the-middle tokens). The model-level work, and how it
yields to Ask, Solve and Fix, is local_model/ghost.py.
"""

from __future__ import annotations

import asyncio
from typing import Any

from dialog import InvalidInput, NotFound
from dialog.completions import add_completion, decide_completion
from local_model import ModelError
from local_model.ghost import ghost_complete

MAX_TOKENS = 48
MAX_TOKENS_LIMIT = 256
LOADING = {"status": "loading", "text": "", "message": "The model is loading; ghost text comes once it is ready."}


def context_above(messages: list[dict], cell: dict) -> str:
    """The cells above `cell` as the text before it: code as it is, notes and prompts as Python comments in a
    code cell (as text in a prompt cell), each followed by a blank line."""
    parts = []
    for m in messages:
        if m["position"] >= cell["position"]:
            break
        if m.get("skipped") or not m["source"].strip():
            continue
        text = m["source"].rstrip("\n")
        if cell["type"] == "code" and m["type"] != "code":
            text = "\n".join("# " + line if line.strip() else "#" for line in text.split("\n"))
        parts.append(text + "\n\n")
    return "".join(parts)


def _cursor(body: dict, text: str) -> int:
    pos = body.get("cursor")
    if pos is None:
        return len(text)
    if isinstance(pos, bool) or not isinstance(pos, int) or not 0 <= pos <= len(text):
        raise InvalidInput(f"'cursor' must be a whole number from 0 to the text's length in code points "
                           f"({len(text)}); got {str(pos)[:40]!r}.")
    return pos


def _max_tokens(body: dict, default: int) -> int:
    n = body.get("max_tokens", default)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_TOKENS_LIMIT:
        raise InvalidInput(f"'max_tokens' must be a whole number from 1 to {MAX_TOKENS_LIMIT}; got {str(n)[:40]!r}.")
    return n


async def ghost(ws, dialog_id: Any, body: dict, *, max_tokens: int = MAX_TOKENS) -> dict:
    """{"status", "text", "id", "message", "figures"}: status ok (text may be ""), busy (the model is answering
    or a newer completion came: show nothing), loading, no_model or unsupported (with a message to show)."""
    d = ws.store.get_dialog(dialog_id)
    if body.get("message_id") is None:
        raise InvalidInput("'message_id' must be the id of the code or prompt cell typed in.")
    m = ws.store.get_message(body["message_id"])
    if m["dialog_id"] != d["id"]:
        raise NotFound(f"Message {m['id']} is not in dialog {d['id']}.")
    if m["type"] not in ("code", "prompt"):
        raise InvalidInput(f"Message {m['id']} is a {m['type']}; ghost text is for code and prompt cells.")
    text = body.get("text", m["source"])
    if not isinstance(text, str):
        raise InvalidInput("'text' must be a string: the cell's text as it is in the editor.")
    pos = _cursor(body, text)
    n = _max_tokens(body, max_tokens)
    engine = ws.models.engine
    # Loading, or swapping for another model (an Ask that named one): the engine at hand may close mid-way.
    if ws.models.loading:
        return dict(LOADING)
    if engine is None:
        status = ws.models.status()
        why = f": {status['error']}" if status.get("error") else ""
        return {"status": "no_model", "text": "", "message": f"No model is loaded{why}."}
    prefix = context_above(ws.store.messages(d["id"]), m) + text[:pos]
    suffix = text[pos:]
    try:
        res = await asyncio.to_thread(ghost_complete, engine, prefix, suffix, max_tokens=n,
                                      kind="code" if m["type"] == "code" else "text")
    except ModelError:
        if ws.models.loading or ws.models.engine is not engine:
            return dict(LOADING)  # the model was swapped while it worked
        raise
    out = {"status": res.status, "text": res.text if res.status == "ok" else "", "message": res.message,
           "figures": {k: v for k, v in res.as_dict().items() if k not in ("status", "text", "message")}}
    if res.status == "ok" and res.text.strip():
        out["id"] = add_completion(ws.store, dialog_id=d["id"], message_id=m["id"], cell_type=m["type"],
                                   model=engine.manifest.get("model"), mode=res.mode, prefix=prefix, suffix=suffix,
                                   suggestion=res.text, figures=out["figures"])
    return out


def decide(ws, dialog_id: Any, body: dict) -> dict:
    """Record a suggestion's outcome: {"id", "outcome": accepted | edited | dropped, "final": the text it became}."""
    d = ws.store.get_dialog(dialog_id)
    row = decide_completion(ws.store, body.get("id"), body.get("outcome"), body.get("final"), dialog_id=d["id"])
    return {"id": row["id"], "outcome": row["outcome"]}
