"""Answer a prompt cell: build its context, stream the model's reply, store it as it grows."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from dialog import InvalidInput, Store
from dialog.context import ContextOptions, build_context
from kernels import KernelInitError, KernelPool, KernelStartError
from kernels.namespace import ToolSpec, VariableNote
from local_model import Engine, ModelError, Sampling

from .live import Live
from .prompt_refs import Resolved, find_refs, prompt_text, resolve
from .tools import KernelTools, call_label, run_tools
from ..settings import ASK, SETTINGS, check, keys
from ..traces import TraceStore

SAVE_EVERY_S = 1.0          # a crash mid-reply loses at most this much of it
CONTEXT_MARGIN_TOKENS = 64  # chat-template tokens the count may miss


@dataclass
class AskResult:
    reply: str
    status: str             # done, cancelled, error
    figures: dict
    manifest: dict
    error: str | None = None
    notes: list[str] = field(default_factory=list)  # references that could not be read, a tool loop cut short
    tools: dict | None = None  # the tools offered and each step's calls (as in reply_meta)


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


@dataclass
class KernelAccess:
    """The dialog's kernel for `$`name`` and `&`fn``: the pool and how to get the key of a ready kernel."""

    pool: KernelPool
    key: Callable[[], Awaitable[str]]


async def ask(store: Store, engine: Engine, message_id: Any, *, sampling: Sampling | None = None,
              live: Live | None = None, request_id: str | None = None, kernel: KernelAccess | None = None,
              tool_steps: int = SETTINGS["tool_steps"].default, stop: asyncio.Event | None = None) -> AskResult:
    """Stream a reply to prompt `message_id` into the store (and `live`, for the page). `$`name`` values and
    `&`fn`` tools come from `kernel`; with tools, the model's calls run there for up to `tool_steps` steps."""
    m = store.get_message(message_id)
    if m["type"] != "prompt":
        raise InvalidInput(f"Message {m['id']} is a {m['type']} cell; only prompts are answered.")
    if not m["source"].strip():
        raise InvalidInput("This prompt is empty: write a question first.")
    sampling = sampling or Sampling()
    refs = find_refs(m["source"])
    manifest = dict(engine.manifest)
    rid = request_id or uuid.uuid4().hex
    meta = {"status": "streaming", "request_id": rid, "model": manifest.get("model"),
            "backend": manifest.get("backend"), "sampling": sampling.as_dict()}
    # Before the kernel is asked anything: the page shows the reply as started at once.
    store.update_message(m["id"], reply="", reply_meta=meta)
    said = {"before": "", "text": "", "saved": time.monotonic()}  # earlier steps' text, this step's, last save

    def on_token(piece: str) -> None:
        said["text"] += piece
        if time.monotonic() - said["saved"] > SAVE_EVERY_S:
            store.update_message(m["id"], reply=said["before"] + said["text"])
            said["saved"] = time.monotonic()

    async def step(messages: list[dict], s: Sampling) -> dict:
        said["text"] = ""
        done = await _stream_step(engine, messages, s, dialog_key(m["dialog_id"]), rid, live, on_token)
        said["before"] = "\n\n".join(t for t in (said["before"], (done.get("text") or "").strip()) if t)
        return done

    result = AskResult("", "error", {}, manifest)
    extra: dict[str, Any] = {}
    try:
        resolved = await _resolve(refs, m, kernel)
        if resolved is not None:
            extra["refs"] = resolved.to_dict()
            for note in resolved.notes:
                if live:
                    live.publish({"type": "note", "text": note})
        prompt = {**m, "source": resolved.text} if resolved is not None else m
        messages = context_for(store, engine, prompt, sampling.max_tokens)
        if resolved is not None and resolved.tools and kernel is not None:
            result = await _answer_with_tools(store, engine, m, messages, sampling, resolved, kernel, step, rid,
                                              tool_steps, live, stop, extra)
        else:
            done = await step(messages, sampling)
            result = _result(done, done.get("text") or "", manifest)
    except ModelError as e:
        result = AskResult(said["before"] or said["text"], "error", {}, manifest, error=str(e))
    finally:
        final = {**meta, "status": result.status, "figures": result.figures, "error": result.error,
                 "finish_reason": result.status, **extra}
        store.update_message(m["id"], reply=result.reply or said["before"] or said["text"], reply_meta=final)
        if live:
            live.publish({"type": "done", "status": result.status, "error": result.error})
            live.close()
    result.tools = extra.get("tools")
    result.notes = (extra.get("refs") or {}).get("notes", []) + [n for n in [(result.tools or {}).get("note")] if n]
    return result


def _result(done: dict, reply: str, manifest: dict) -> AskResult:
    status = "cancelled" if done.get("finish_reason") == "cancelled" else "done"
    return AskResult(reply, status, done.get("figures") or {}, manifest)


async def _stream_step(engine: Engine, messages: list[dict], sampling: Sampling, cache_key: str, rid: str,
                       live: Live | None, on_token: Callable[[str], None]) -> dict:
    """One generation, its tokens to the page as they come; its done event."""
    done: dict = {"type": "done", "text": "", "finish_reason": "error", "figures": {},
                  "error": "the model ended without a reply"}
    async for ev in engine.stream(messages, sampling, cache_key=cache_key, request_id=rid):
        if ev["type"] == "token":
            on_token(ev["text"])
            if live:
                live.publish(ev)
        elif ev["type"] == "done":
            done = ev
    return done


async def _resolve(refs, m: dict, kernel: KernelAccess | None) -> Resolved | None:
    """The prompt's `$`/`&` references read from the kernel (None when it has none); a kernel that cannot answer
    is a note, and the prompt goes on without the values."""
    if not refs:
        return None
    why = "there is no kernel to read it from here"
    if kernel is not None:
        try:
            return await resolve(kernel.pool, await kernel.key(), m["source"], refs)
        except (KernelStartError, KernelInitError, OSError, RuntimeError) as e:
            why = f"the dialog's kernel could not be asked ({type(e).__name__}: {e})"
    values = [VariableNote(n, "error", None, why) for n in refs.variables]
    specs = [ToolSpec(n, "error", None, why) for n in refs.tools]
    return Resolved(prompt_text(m["source"], values, specs), [], values, specs)


async def _answer_with_tools(store: Store, engine: Engine, m: dict, messages: list[dict], sampling: Sampling,
                             resolved: Resolved, kernel: KernelAccess, step, rid: str, tool_steps: int,
                             live: Live | None, stop: asyncio.Event | None, extra: dict) -> AskResult:
    """The tool-step loop: every step stored as it finishes (reply_meta and the tool_steps table), every call
    shown live."""
    manifest = dict(engine.manifest)
    traces = TraceStore(store)
    tools = KernelTools(kernel.pool, await kernel.key(), resolved.tools)
    extra["tools"] = {"offered": resolved.tools, "steps": [], "note": None}

    def on_call(n: int, rec: dict) -> None:
        if live:
            # the result's own type goes as result_type: "type" names the event
            live.publish({**rec, "result_type": rec["type"], "step": n, "label": call_label(rec), "type": "tool"})

    def on_step(record: dict, inputs: list[dict]) -> None:
        extra["tools"]["steps"].append({k: v for k, v in record.items() if k != "figures"})
        traces.add_tool_step(inputs, request_id=rid, step=record["step"], dialog_id=m["dialog_id"], message_id=m["id"],
                             tools=resolved.tools if record["step"] == 0 else None, completion=record["text"],
                             calls=record["calls"], finish_reason=record["finish_reason"], figures=record["figures"],
                             model=manifest.get("model"), backend=manifest.get("backend"))

    run = await run_tools(step, messages, sampling, tools, tool_steps, on_call=on_call, on_step=on_step,
                          stopped=lambda: stop is not None and stop.is_set())
    extra["tools"]["note"] = run.note
    if run.note and live:
        live.publish({"type": "note", "text": run.note})
    result = _result(run.done, run.text, manifest)
    result.figures = {**result.figures, "tool_steps": len(run.steps),
                      "tool_calls": sum(c["status"] != "not_run" for s in run.steps for c in s["calls"])}
    return result
