"""Answer a prompt cell: build its context, stream the model's reply, store it as it grows."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

from dialog import InvalidInput, Store
from dialog.context import ContextOptions, build_context
from local_model import Engine, ModelError, Sampling

from .live import Live
from ..settings import ASK, check, keys

SAVE_EVERY_S = 1.0          # a crash mid-reply loses at most this much of it
CONTEXT_MARGIN_TOKENS = 64  # chat-template tokens the count may miss


@dataclass
class AskResult:
    reply: str
    status: str             # done, cancelled, error
    figures: dict
    manifest: dict
    error: str | None = None


def dialog_key(dialog_id: int) -> str:
    """The kernel and model-cache key of a dialog."""
    return f"dialog-{dialog_id}"


def context_for(store: Store, engine: Engine, message: dict, max_tokens: int,
                cells: list[dict] | None = None) -> list[dict]:
    """The model input for a prompt message, trimmed to fit the model's context window."""
    dialog = store.get_dialog(message["dialog_id"])
    settings = dialog["settings"]
    n_ctx = getattr(engine.backend, "n_ctx", None)
    budget = (n_ctx - max_tokens - CONTEXT_MARGIN_TOKENS) if n_ctx else None
    opts = ContextOptions(system_prompt=settings.get("system_prompt") or None, budget_tokens=budget,
                          images=bool(getattr(engine.backend, "supports_images", False)))
    cells = cells if cells is not None else store.messages(message["dialog_id"])
    return build_context(cells, message, options=opts, count_tokens=engine.backend.count_tokens)


def sampling_from(settings: dict, overrides: dict | None = None) -> Sampling:
    """Sampling from dialog settings, then per-request overrides (None: not given), each checked against the
    settings table, so a bad value is a 400, not a failed generation; unknown keys are refused."""
    values = {k: settings[k] for k in keys(ASK) if settings.get(k) is not None}
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    check(values, ASK)
    return Sampling(**values)


async def ask(store: Store, engine: Engine, message_id: Any, *, sampling: Sampling | None = None,
              live: Live | None = None, request_id: str | None = None) -> AskResult:
    """Stream a reply to prompt `message_id` into the store (and `live`, for the page)."""
    m = store.get_message(message_id)
    if m["type"] != "prompt":
        raise InvalidInput(f"Message {m['id']} is a {m['type']} cell; only prompts are answered.")
    if not m["source"].strip():
        raise InvalidInput("This prompt is empty: write a question first.")
    sampling = sampling or Sampling()
    messages = context_for(store, engine, m, sampling.max_tokens)
    manifest = dict(engine.manifest)
    rid = request_id or uuid.uuid4().hex
    meta = {"status": "streaming", "request_id": rid, "model": manifest.get("model"),
            "backend": manifest.get("backend"), "sampling": sampling.as_dict()}
    store.update_message(m["id"], reply="", reply_meta=meta)
    text, last_save = "", time.monotonic()
    result = AskResult("", "error", {}, manifest)
    try:
        async for ev in engine.stream(messages, sampling, cache_key=dialog_key(m["dialog_id"]), request_id=rid):
            if ev["type"] == "token":
                text += ev["text"]
                if live:
                    live.publish(ev)
                if time.monotonic() - last_save > SAVE_EVERY_S:
                    store.update_message(m["id"], reply=text)
                    last_save = time.monotonic()
            elif ev["type"] == "done":
                status = "cancelled" if ev.get("finish_reason") == "cancelled" else "done"
                result = AskResult(ev.get("text") or text, status, ev.get("figures") or {}, manifest)
    except ModelError as e:
        result = AskResult(text, "error", {}, manifest, error=str(e))
    finally:
        final = {**meta, "status": result.status, "figures": result.figures, "error": result.error,
                 "finish_reason": result.status}
        store.update_message(m["id"], reply=result.reply or text, reply_meta=final)
        if live:
            live.publish({"type": "done", "status": result.status, "error": result.error})
            live.close()
    return result
