"""Ghost text: the model's completion at an editor's cursor, from its own llama.cpp context.

A GhostCompleter makes a third context on the backend's loaded model (no second load of the weights,
as batch.py's SharedPromptBatch does), so a completion never touches the main context, its saved
per-dialog states or its lock: an Ask, Solve or Fix is served exactly as it would be without it.
The completer keeps the tokens its context holds; the next completion reuses the KV cells of the
unchanged part and reads only what changed (typing at the cursor: the typed text, then the suffix).

Fill-in-the-middle where the vocabulary has FIM tokens (Qwen2.5-Coder's <|fim_prefix|>, StarCoder's
<fim_prefix>), else the text before the cursor alone. Greedy, short (one line, or one block after a
line that opens one), and it yields: `should_stop` is asked between tokens and prompt chunks, and the
caller answers True as soon as the engine has other work (ghost_complete below).

A LoRA adapter loaded on the resident model is applied to the main context only: ghost text comes from the
base weights.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

from .prefix_cache import common_prefix_bytes, common_prefix_tokens
from .protocol import ModelError
from .threads import adaptive, runnable_elsewhere, threads_now

GHOST_CTX = 4096      # the completer's context (tokens); the prompt is trimmed to fit it
CHUNK = 32            # prompt tokens read per llama_decode, so a request for the engine stops us quickly
# The most of the text after the cursor that is read (its start: what follows the cursor most closely). Fill-in-
# the-middle puts it after the prefix, so it is read again at every completion; on 2 busy CPU cores each of its
# tokens cost 15-50 ms with the 1.5B coder model (bench/bench_ghost.py).
SUFFIX_TOKENS = 32
MAX_BLOCK_LINES = 8
FIM_NAMES = (("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),   # Qwen2.5-Coder
             ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),          # StarCoder, SantaCoder
             ("<fim-prefix>", "<fim-suffix>", "<fim-middle>"))


@dataclass(frozen=True)
class Fim:
    prefix: int
    suffix: int
    middle: int


def find_fim(single_token: Callable[[str], int | None], builtin: tuple[int, int, int] = (-1, -1, -1)) -> Fim | None:
    """The FIM token ids: those llama.cpp read from the GGUF, else the first known spelling that is one token each."""
    if all(t >= 0 for t in builtin):
        return Fim(*builtin)
    for names in FIM_NAMES:
        ids = [single_token(n) for n in names]
        if all(i is not None for i in ids):
            return Fim(*ids)
    return None


def prompt_tokens(prefix: list[int], suffix: list[int], fim: Fim | None, bos: int | None = None) -> list[int]:
    """The prompt: <PRE> prefix <SUF> suffix <MID> with FIM (the PSM order), else [BOS] prefix."""
    if fim is not None:
        return [fim.prefix, *prefix, fim.suffix, *suffix, fim.middle]
    return ([bos] if bos is not None else []) + list(prefix)


def scope_for(prefix: str, kind: str = "code") -> str:
    """How far a suggestion goes: "line" after text on the cursor's line; "block" at a blank line or after one
    that opens a block (ends with ':'). Prose (a prompt cell) always gets a line."""
    line = prefix.rsplit("\n", 1)[-1]
    if kind != "code" or (line.strip() and not line.rstrip().endswith(":")):
        return "line"
    return "block"


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" \t"))


def cut_suggestion(text: str, scope: str, line_before: str) -> tuple[str, bool]:
    """(the suggestion so far, cut where it should end; whether it has ended)."""
    if scope == "none":
        return text, False
    if scope == "line":
        end = text.find("\n")
        return (text, False) if end < 0 else (text[:end], True)
    # A block: after "if x:" its body (lines indented deeper); at a blank line, lines at its indent or deeper.
    opens = line_before.rstrip().endswith(":")
    base = _indent(line_before)
    lines = text.split("\n")
    at = len(lines[0])
    for n, line in enumerate(lines[1:], start=1):
        followed = n < len(lines) - 1  # the line is complete
        if line.strip():
            ends = _indent(line) <= base if opens else _indent(line) < base
        else:
            ends = followed  # a blank line ends the block; spaces alone may still become a line
        if ends or n > MAX_BLOCK_LINES:
            return text[:at].rstrip(" \t"), True
        at += 1 + len(line)
    return text, False


def trim_start(text: str, limit: int) -> str:
    """The end of `text`, at most `limit` characters, cut at a multiple of limit/4 so that the cut stays put
    while the text grows at its end (the completer's KV cells stay reusable)."""
    if len(text) <= limit:
        return text
    step = max(limit // 4, 1)
    return text[((len(text) - limit) // step + 1) * step:]


@dataclass
class GhostResult:
    status: str                 # ok, busy (the engine had work, or a newer completion came), unsupported, error
    text: str = ""
    finish: str = ""            # stop (end of line/block, end of text), length (max_tokens), cancelled
    mode: str = ""              # fim or prefix
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    evaluated_prompt_tokens: int = 0
    suffix_tokens: int = 0
    completion_tokens: int = 0
    ttft_s: float | None = None
    total_s: float = 0.0
    message: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class GhostCompleter:
    """One llama.cpp context of its own on `backend`'s loaded model; one completion at a time, the newest wins."""

    def __init__(self, backend, n_ctx: int = GHOST_CTX):
        from llama_cpp._internals import LlamaBatch, LlamaContext

        self.backend = backend
        llm, lib = backend.llm, backend._lib
        self._lib, self._vocab = lib, backend._vocab
        params = lib.llama_context_params.from_buffer_copy(llm.context_params)
        params.n_ctx = min(n_ctx, backend.n_ctx)
        params.n_seq_max = 1
        params.n_batch = params.n_ubatch = max(CHUNK, min(params.n_batch, 512))
        self.ctx = LlamaContext(model=llm._model, params=params, verbose=False)
        self.n_ctx = self.ctx.n_ctx()
        self._batch = LlamaBatch(n_tokens=CHUNK, embd=0, n_seq_max=1, verbose=False)
        self._memory = lib.llama_get_memory(self.ctx.ctx)
        self._sampler = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        lib.llama_sampler_chain_add(self._sampler, lib.llama_sampler_init_greedy())
        v = self._vocab
        self.fim = find_fim(self._single_token, (lib.llama_vocab_fim_pre(v), lib.llama_vocab_fim_suf(v),
                                                lib.llama_vocab_fim_mid(v)))
        self.mode = "fim" if self.fim else "prefix"
        self._bos = backend._bos_id if (backend._add_bos and self.fim is None) else None
        self._held: list[int] = []           # the tokens whose KV cells the context holds, in order
        self._prefix_text = b""               # the prefix text last read, and its tokens (for splicing)
        self._prefix_tokens: list[int] = []
        self._prefix_ends: list[int] = []
        self._lock = threading.Lock()
        self._serial = 0
        self._serial_lock = threading.Lock()
        self._threads: tuple[int, int] | None = None
        self._adaptive = adaptive()
        self.closed = False

    # -- tokens ------------------------------------------------------------------------------------

    def _single_token(self, text: str) -> int | None:
        ids = self.backend.llm.tokenize(text.encode(), add_bos=False, special=True)
        return ids[0] if len(ids) == 1 else None

    def _tokenize(self, text: bytes) -> list[int]:
        return self.backend.llm.tokenize(text, add_bos=False, special=False) if text else []

    def _prefix(self, text: bytes) -> list[int]:
        """The prefix's tokens: those of the last prefix whose text is unchanged are kept (but the last of them,
        which the new text may merge into), and only the rest is tokenized."""
        same = common_prefix_bytes(self._prefix_text, text)
        keep = 0
        while keep < len(self._prefix_ends) and self._prefix_ends[keep] <= same:
            keep += 1
        keep = max(keep - 1, 0)
        start = self._prefix_ends[keep - 1] if keep else 0
        tokens = self._prefix_tokens[:keep] + self._tokenize(text[start:])
        ends = self._prefix_ends[:keep]
        pos = start
        for t in tokens[keep:]:
            pos += len(self.backend._piece(t, special=False))
            ends.append(pos)
        if ends and ends[-1] != len(text):  # a piece that does not spell its bytes back: do not splice next time
            tokens, ends = tokens, []
            text = b""
        self._prefix_text, self._prefix_tokens, self._prefix_ends = text, tokens, ends
        return tokens

    def build(self, prefix: str, suffix: str, max_tokens: int) -> tuple[list[int], int]:
        """(the prompt's tokens, how many of them are the suffix), trimmed to leave room for max_tokens."""
        budget = self.n_ctx - max_tokens - 4
        if budget < 16:
            raise ModelError(f"max_tokens {max_tokens} leaves no room for a prompt in the completer's "
                             f"{self.n_ctx}-token context")
        suf: list[int] = []
        if self.fim is not None:
            suf = self._tokenize(suffix[: SUFFIX_TOKENS * 8].encode())[:min(SUFFIX_TOKENS, budget // 4)]
        room = budget - len(suf)
        pre = self._prefix(trim_start(prefix, room * 6).encode())
        if len(pre) > room:  # drop from the start in steps, so the cut stays put while typing goes on
            step = max(room // 4, 1)
            pre = pre[((len(pre) - room) // step + 1) * step:] if len(pre) - room > 0 else pre
        return prompt_tokens(pre, suf, self.fim, self._bos), len(suf)

    # -- llama.cpp ---------------------------------------------------------------------------------

    def _set_threads(self) -> None:
        most = self.backend._most_threads
        counts = (threads_now(most[0], runnable_elsewhere()), threads_now(most[1], runnable_elsewhere())) \
            if self._adaptive else most
        if counts != self._threads:
            self._lib.llama_set_n_threads(self.ctx.ctx, *counts)
            self._threads = counts

    def _decode(self, tokens: list[int], pos: int) -> None:
        b = self._batch.batch
        b.n_tokens = len(tokens)
        for i, tok in enumerate(tokens):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos + i, 1, i == len(tokens) - 1
            b.seq_id[i][0] = 0
        rc = self._lib.llama_decode(self.ctx.ctx, b)
        if rc != 0:
            raise ModelError(f"llama.cpp could not decode the completion's tokens (llama_decode returned {rc})")
        self._held.extend(tokens)

    def _keep(self, n: int) -> int:
        """Drop the context's cells from position n on; returns how many are kept."""
        if n < len(self._held):
            if not self._lib.llama_memory_seq_rm(self._memory, 0, n, -1):
                self._lib.llama_memory_clear(self._memory, True)
                n = 0
            del self._held[n:]
        return n

    def _ends(self, tok: int) -> bool:
        lib, v = self._lib, self._vocab
        return bool(lib.llama_vocab_is_eog(v, tok) or lib.llama_vocab_is_control(v, tok))

    # -- the completion ----------------------------------------------------------------------------

    def complete(self, prefix: str, suffix: str = "", *, max_tokens: int = 48, scope: str | None = None,
                 should_stop: Callable[[], bool] | None = None,
                 on_token: Callable[[str], None] | None = None) -> GhostResult:
        """The suggestion at the cursor between `prefix` and `suffix`. A newer call makes this one stop
        (status busy); so does `should_stop()` returning True (asked between prompt chunks and tokens)."""
        t0 = time.perf_counter()
        with self._serial_lock:
            self._serial += 1
            mine = self._serial
        outside = should_stop or (lambda: False)

        def stopped() -> bool:
            return self._serial != mine or bool(outside())

        scope = scope or scope_for(prefix)
        line_before = prefix.rsplit("\n", 1)[-1]
        with self._lock:
            if self.closed:
                raise ModelError("the ghost-text completer is closed (the model was swapped or closed)")
            if stopped():
                return GhostResult("busy", finish="cancelled", mode=self.mode, total_s=time.perf_counter() - t0)
            tokens, n_suffix = self.build(prefix, suffix if self.fim else "", max_tokens)
            res = GhostResult("ok", mode=self.mode, prompt_tokens=len(tokens), suffix_tokens=n_suffix)
            self._set_threads()
            # Always read at least the prompt's last token: the first draw needs its logits.
            reuse = self._keep(min(common_prefix_tokens(self._held, tokens), len(tokens) - 1))
            res.cached_prompt_tokens = reuse
            for i in range(reuse, len(tokens), CHUNK):
                if stopped():
                    return self._cancelled(res, t0)
                self._decode(tokens[i:i + CHUNK], i)
                res.evaluated_prompt_tokens += len(tokens[i:i + CHUNK])
            text, raw = "", b""
            while res.completion_tokens < max_tokens:
                if stopped():
                    return self._cancelled(res, t0, text)
                tok = self._lib.llama_sampler_sample(self._sampler, self.ctx.ctx, -1)
                if res.ttft_s is None:
                    res.ttft_s = time.perf_counter() - t0
                if self._ends(tok):
                    res.finish = "stop"
                    break
                res.completion_tokens += 1
                raw += self.backend._piece(tok, special=False)
                full = raw.decode("utf-8", "ignore")
                text, done = cut_suggestion(full, scope, line_before)
                if on_token is not None:
                    on_token(text)
                if done:
                    res.finish = "stop"
                    break
                if len(self._held) >= self.n_ctx:
                    break
                self._decode([tok], len(self._held))
            res.finish = res.finish or "length"
            res.text = text
            res.total_s = time.perf_counter() - t0
            return res

    def _cancelled(self, res: GhostResult, t0: float, text: str = "") -> GhostResult:
        res.status, res.finish, res.text, res.total_s = "busy", "cancelled", "", time.perf_counter() - t0
        res.message = "The model has other work; ghost text yields to it."
        return res

    def cancel(self) -> None:
        """Stop the completion under way (a newer one would too)."""
        with self._serial_lock:
            self._serial += 1

    def close(self) -> None:
        """Free the context (once; a completion under way stops first)."""
        self.cancel()
        with self._lock:
            if self.closed:
                return
            self.closed = True
            self._lib.llama_sampler_free(self._sampler)
            self._batch.close()
            self.ctx.close()


def ghost_complete(engine, prefix: str, suffix: str = "", *, max_tokens: int = 48, kind: str = "code",
                   on_token: Callable[[str], None] | None = None) -> GhostResult:
    """A completion at the cursor from the engine's model, which yields to the engine's own work: "busy" at once
    while a generation runs or waits, and stopped within a token when one arrives. Blocking (run it in a thread)."""
    make = getattr(engine.backend, "ghost", None)
    if make is None:
        backend = engine.manifest.get("backend") or "this"
        return GhostResult("unsupported", message=f"Ghost text needs the in-process llama.cpp model; the {backend} "
                                                  f"backend has no completion at the cursor here.")
    if engine.busy or engine.queue_depth:
        return GhostResult("busy", finish="cancelled", message="The model is answering; ghost text waits for it.")
    completer = make()
    return completer.complete(prefix, suffix, max_tokens=max_tokens, scope=scope_for(prefix, kind),
                              should_stop=lambda: engine.busy or engine.queue_depth > 0, on_token=on_token)
