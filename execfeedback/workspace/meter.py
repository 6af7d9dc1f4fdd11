"""The token meter: how many tokens each cell adds to the model's context, the dialog's context against n_ctx,
and, for each prompt over its budget, which cells build_context will leave out, before it is sent.

Counts come from the resident model's tokenizer (`count_tokens`; remote backends estimate) or, with no model
loaded, about four characters a token (marked `estimated`). Each cell's count is cached by (model, cell id,
version): a page of 1,000 cells renders from the cache, and only a changed cell is counted again.
"""

from __future__ import annotations

import bisect
from typing import Any, Callable

from dialog.context import DEFAULT_SYSTEM_PROMPT, cell_context_text
from local_model.resident import Resident

from .ask import CONTEXT_MARGIN_TOKENS

CACHE_MAX = 100_000  # entries; cleared whole when full (a count is cheap to redo)
CHARS_PER_TOKEN = 4


def estimate(text: str) -> int:
    return (len(text) + CHARS_PER_TOKEN - 1) // CHARS_PER_TOKEN


class TokenMeter:
    def __init__(self, models: Resident, defaults: dict[str, Any]):
        self.models = models
        self.defaults = defaults
        self._cache: dict[tuple, int] = {}

    def counter(self) -> tuple[str, Callable[[str], int], bool, int]:
        """(model key, count(text), estimated, n_ctx) for the model loaded now."""
        engine = self.models.engine
        if engine is None:
            return "estimate", estimate, True, int(self.models.load_kwargs.get("n_ctx") or 8192)
        m = engine.manifest
        key = f"{m.get('backend')}:{m.get('sha256') or m.get('model')}"
        backend = engine.backend
        exact = m.get("backend") == "llama"

        def count(text: str) -> int:
            try:
                return int(backend.count_tokens(text))
            except Exception:  # a tokenizer that fails must not take the page down
                return estimate(text)

        n_ctx = getattr(backend, "n_ctx", None) or int(self.models.load_kwargs.get("n_ctx") or 8192)
        return key, count, not exact, int(n_ctx)

    def _cached(self, key: tuple, text: Callable[[], str], count: Callable[[str], int]) -> int:
        n = self._cache.get(key)
        if n is None:
            if len(self._cache) >= CACHE_MAX:
                self._cache.clear()
            t = text()
            n = self._cache[key] = count(t) if t else 0
        return n

    def cell_tokens(self, m: dict, counter: tuple | None = None) -> int:
        """Tokens this cell adds to the context (skipped cells too: what they would add)."""
        mkey, count, _, _ = counter or self.counter()
        return self._cached((mkey, m["id"], m.get("version")), lambda: cell_context_text(m), count)

    def dialog(self, d: dict, messages: list[dict]) -> dict:
        """The meter of one dialog: per-cell tokens, context used (system prompt and every cell not skipped)
        against n_ctx, and each prompt's budget (n_ctx less its reply's max_tokens and a margin, as Ask's) with
        the cells left out when it is over."""
        counter = self.counter()
        mkey, count, estimated, n_ctx = counter
        settings = d.get("settings") if isinstance(d.get("settings"), dict) else {}
        # Stored settings may hold any type (an older store, a hand-edited file): only a str and an int count.
        system = settings.get("system_prompt")
        system = system if isinstance(system, str) and system else DEFAULT_SYSTEM_PROMPT
        system_tokens = self._cached((mkey, "system", system), lambda: system, count)
        max_tokens = settings.get("max_tokens")
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens <= 0:
            max_tokens = self.defaults.get("max_tokens") or 1024
        budget = max(0, n_ctx - int(max_tokens) - CONTEXT_MARGIN_TOKENS)
        cells = {m["id"]: self.cell_tokens(m, counter) for m in messages}
        prompts: dict[int, dict] = {}
        above = 0
        # dialog.context.dropped_by_budget's rule (the oldest unpinned cells go first, until the rest fits), for
        # every prompt at once: the unpinned cells so far and their running sums; a prompt over by `excess` drops
        # the shortest run of them whose tokens reach it (a bisection, not a walk per prompt).
        droppable: list[int] = []
        sums: list[int] = []
        for m in messages:
            if m["type"] == "prompt":
                own = self._cached((mkey, m["id"], m.get("version"), "prompt"), lambda: m["source"].strip(), count)
                total = system_tokens + own + above
                excess = total - budget
                dropped = droppable[:bisect.bisect_left(sums, excess) + 1] if excess > 0 else []
                prompts[m["id"]] = {"tokens": total, "dropped": dropped}
            n = cells[m["id"]]
            if not m.get("skipped") and n:
                above += n
                if not m.get("pinned"):
                    droppable.append(m["id"])
                    sums.append((sums[-1] if sums else 0) + n)
        return {"model": mkey, "estimated": estimated, "n_ctx": n_ctx, "max_tokens": int(max_tokens),
                "budget": budget, "system_tokens": system_tokens, "used": system_tokens + above,
                "cells": cells, "prompts": prompts}

    def prompt(self, m: dict, d: dict, messages: list[dict]) -> dict:
        """One prompt's budget: {"tokens", "dropped"} (the whole dialog's meter, from the cache)."""
        return self.dialog(d, messages)["prompts"].get(m["id"], {"tokens": 0, "dropped": []})
