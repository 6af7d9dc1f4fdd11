"""Reusing evaluated tokens across turns: per-dialog token histories and saved KV states.

A dialog grows at its end, so each turn's prompt starts with the previous turn's prompt and reply.
Two things can still break the token prefix, and both are handled here:
- the reply's text, tokenized again as part of the next prompt, may not give the tokens the model
  generated (BPE is not unique), or the template may render it slightly differently. So the next
  prompt is built by *splicing*: the tokens of the history whose text is a prefix of the new prompt
  text are kept as they were, and only the rest of the text is tokenized.
- another dialog used the one llama.cpp context in between. So each dialog's KV state is saved
  (llama.cpp's per-sequence state, which holds only the used cells) when another dialog takes the
  context over, and restored when the dialog comes back, in an LRU bounded by bytes.
"""
from __future__ import annotations

import ctypes
from bisect import bisect_right
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np


def common_prefix_bytes(a: bytes, b: bytes) -> int:
    """Length of the common prefix, by binary search over C-level slice comparisons."""
    n = min(len(a), len(b))
    ma, mb = memoryview(a), memoryview(b)
    if ma[:n] == mb[:n]:
        return n
    lo, hi = 0, n - 1  # the answer is < n
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if ma[:mid] == mb[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def common_prefix_tokens(a: Sequence[int] | np.ndarray, b: Sequence[int] | np.ndarray) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.asarray(a[:n], dtype=np.int64) != np.asarray(b[:n], dtype=np.int64)
    return int(np.argmax(diff)) if diff.any() else n


@dataclass
class TokenHistory:
    """The tokens of a KV state and the text they spell (byte offsets where each token ends)."""

    tokens: list[int]
    ends: list[int]
    text: bytes

    @classmethod
    def build(cls, tokens: Sequence[int], piece: Callable[[int], bytes], implicit_bos: int | None = None) -> "TokenHistory":
        ends, parts, pos = [], [], 0
        for i, t in enumerate(tokens):
            p = b"" if (i == 0 and implicit_bos is not None and t == implicit_bos) else piece(t)
            parts.append(p)
            pos += len(p)
            ends.append(pos)
        return cls(tokens=list(tokens), ends=ends, text=b"".join(parts))


def splice_prompt(history: TokenHistory | None, prompt: bytes, tokenize: Callable[[bytes, bool], list[int]]) -> list[int]:
    """Tokens for `prompt` that keep the history's tokens for the part of the text they share.

    `tokenize(text, at_start)` tokenizes a piece of prompt text (at_start: it begins the prompt).
    """
    if history is None or not history.tokens:
        return tokenize(prompt, True)
    c = common_prefix_bytes(history.text, prompt)
    k = bisect_right(history.ends, c)  # tokens lying wholly inside the shared text
    if c < len(history.text) and k > 0:
        # The prompt diverges inside the history (an edit, or a template that trims the reply):
        # give the tokenizer the last shared token back so it can merge across the cut.
        k -= 1
    while k > 0:
        cut = history.ends[k - 1]
        if cut >= len(prompt) or (prompt[cut] & 0xC0) != 0x80:  # not inside a UTF-8 character
            break
        k -= 1
    if k == 0:
        return tokenize(prompt, True)
    cut = history.ends[k - 1]
    return history.tokens[:k] + (tokenize(prompt[cut:], False) if cut < len(prompt) else [])


@dataclass
class SavedState:
    """One dialog's KV state as llama.cpp serialized it, and the tokens it holds."""

    buf: ctypes.Array
    size: int
    tokens: np.ndarray


class StateLRU:
    """Saved states by cache key, least recently used dropped first when over max_bytes."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, SavedState] = OrderedDict()
        self.total_bytes = 0

    def __contains__(self, key: str) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: str) -> SavedState | None:
        return self._items.get(key)

    def pop(self, key: str) -> SavedState | None:
        item = self._items.pop(key, None)
        if item is not None:
            self.total_bytes -= item.size
        return item

    def put(self, key: str, state: SavedState) -> None:
        self.pop(key)
        if state.size > self.max_bytes:
            return  # larger than the whole budget: not kept
        self._items[key] = state
        self.total_bytes += state.size
        while self.total_bytes > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self.total_bytes -= old.size


class HistoryLRU(OrderedDict):
    """Token histories by cache key; small (ints and text), so bounded by count."""

    def __init__(self, max_items: int = 512):
        super().__init__()
        self.max_items = max_items

    def remember(self, key: str, history: TokenHistory) -> None:
        self.pop(key, None)
        self[key] = history
        while len(self) > self.max_items:
            self.popitem(last=False)
