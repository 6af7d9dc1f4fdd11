"""Turn the cells above a prompt into chat messages for a model.

A cell always renders to the same text, whatever comes after it, so the prompt of each turn extends
the last one token for token and the model's KV cache can be reused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .render import IMAGE_MIMES, strip_ansi, text_of, trim_middle

DEFAULT_SYSTEM_PROMPT = (
    "You are a coding assistant inside a Python notebook. You see the notebook's cells: notes, code "
    "with its outputs, and earlier questions with your answers. The code runs in a live Jupyter kernel, "
    "so names defined in earlier cells exist. Answer the last request. When you write code, put it in "
    "one ```python block; it may be run as is."
)


@dataclass
class ContextOptions:
    system_prompt: str | None = None
    budget_tokens: int | None = None      # None: no limit
    output_chars: int = 2000              # per cell, head and tail kept
    traceback_chars: int = 1500
    images: bool = False                  # send images as image parts (Anthropic), else a text note


def render_outputs(outputs: list[dict], opts: ContextOptions) -> tuple[str, list[dict]]:
    """Text of a cell's outputs, plus image parts when the model takes images."""
    texts: list[str] = []
    images: list[dict] = []
    for o in outputs or []:
        kind = o.get("output_type")
        if kind == "stream":
            texts.append(strip_ansi(text_of(o.get("text"))))
        elif kind == "error":
            tb = strip_ansi("\n".join(o.get("traceback") or []))
            head = f"{o.get('ename', 'Error')}: {strip_ansi(str(o.get('evalue', '')))}"
            texts.append(f"{head}\n{trim_middle(tb, opts.traceback_chars)}" if tb else head)
        elif kind in ("execute_result", "display_data"):
            data = o.get("data") or {}
            image = next((m for m in IMAGE_MIMES if m in data), None)
            if image:
                if opts.images:
                    images.append({"type": "image", "mime": image, "data": text_of(data[image]).strip()})
                texts.append(f"[image output: {image}]")
            elif "text/plain" in data:
                texts.append(strip_ansi(text_of(data["text/plain"])))
            elif "text/markdown" in data:
                texts.append(text_of(data["text/markdown"]))
            elif "text/html" in data:
                texts.append("[HTML output]")
    text = "\n".join(t.rstrip("\n") for t in texts if t)
    return trim_middle(text, opts.output_chars), images


def render_cell(m: dict, opts: ContextOptions) -> tuple[str, list[dict]]:
    """One non-prompt cell as text (and images) for the user side of the conversation."""
    if m["type"] == "note":
        return m["source"].strip(), []
    out, images = render_outputs(m.get("outputs") or [], opts)
    parts = [f"```python\n{m['source'].rstrip()}\n```"]
    if out:
        parts.append(f"Output:\n```\n{out}\n```")
    return "\n".join(parts), images


@dataclass
class _Unit:
    """Cells that stay or go together when trimming: one cell, or a prompt with its reply."""

    user_text: str
    images: list[dict]
    reply: str | None
    pinned: bool
    is_prompt: bool


def _units(cells: list[dict], opts: ContextOptions) -> list[_Unit]:
    units = []
    for m in cells:
        if m.get("skipped"):
            continue
        if m["type"] == "prompt":
            units.append(_Unit(m["source"].strip(), [], m.get("reply") or None, bool(m.get("pinned")), True))
        else:
            text, images = render_cell(m, opts)
            if text:
                units.append(_Unit(text, images, None, bool(m.get("pinned")), False))
    return units


def _messages(system: str, units: list[_Unit], final: str | None, omitted: int) -> list[dict]:
    msgs: list[dict] = [{"role": "system", "content": system}]
    pending: list[str] = []
    pending_images: list[dict] = []
    if omitted:
        pending.append(f"[{omitted} earlier cells omitted to fit the context]")

    def flush_user():
        if not pending and not pending_images:
            return
        text = "\n\n".join(pending)
        content = [*pending_images, {"type": "text", "text": text}] if pending_images else text
        msgs.append({"role": "user", "content": content})
        pending.clear()
        pending_images.clear()

    for u in units:
        pending.append(u.user_text)
        pending_images.extend(u.images)
        if u.is_prompt and u.reply:
            flush_user()
            msgs.append({"role": "assistant", "content": u.reply})
    if final is not None:
        pending.append(final)
    flush_user()
    return msgs


def build_context(cells: list[dict], prompt: dict | None = None, *, options: ContextOptions | None = None,
                  count_tokens: Callable[[list[dict]], int] | None = None) -> list[dict]:
    """Chat messages for answering `prompt` from the cells above it (all `cells` if no prompt).

    Skipped cells stay out. Over `budget_tokens`, the oldest unpinned cells go first; the prompt and
    pinned cells always stay.
    """
    opts = options or ContextOptions()
    system = opts.system_prompt or DEFAULT_SYSTEM_PROMPT
    above = cells
    if prompt is not None:
        above = [m for m in cells if m["position"] < prompt["position"]]
    units = _units(above, opts)
    final = prompt["source"].strip() if prompt is not None else None
    msgs = _messages(system, units, final, 0)
    if not opts.budget_tokens or count_tokens is None or count_tokens(msgs) <= opts.budget_tokens:
        return msgs
    kept = list(units)
    omitted = 0
    while count_tokens(msgs) > opts.budget_tokens:
        victim = next((i for i, u in enumerate(kept) if not u.pinned), None)
        if victim is None:
            break
        kept.pop(victim)
        omitted += 1
        msgs = _messages(system, kept, final, omitted)
    return msgs


def cell_context_text(m: dict, opts: ContextOptions | None = None) -> str:
    """What one cell adds to a model's context, as text ("" when nothing): a note's text, code with its outputs
    (render_cell), a prompt with its reply (they stay or go together). Skipped or not: the caller decides."""
    if m["type"] == "prompt":
        return "\n\n".join(t for t in (m["source"].strip(), (m.get("reply") or "").strip()) if t)
    return render_cell(m, opts or ContextOptions())[0]


def dropped_by_budget(cells: list[dict], tokens: Callable[[dict], int], fixed: int,
                      budget: int | None) -> list[int]:
    """The ids of the cells build_context leaves out to fit `budget` tokens, by its rules, from per-cell counts
    (`tokens(cell)`, what cell_context_text counts) plus `fixed` (the system prompt and the prompt): skipped cells
    never count, the oldest unpinned go first, pinned cells stay. Counts add up; the builder counts the whole
    chat-templated input, a few tokens per message more, so at the edge it may drop one cell more."""
    if budget is None:
        return []
    counted = [m for m in cells if not m.get("skipped") and tokens(m)]
    total = fixed + sum(tokens(m) for m in counted)
    dropped: list[int] = []
    for m in counted:
        if total <= budget:
            break
        if not m.get("pinned"):
            total -= tokens(m)
            dropped.append(m["id"])
    return dropped
