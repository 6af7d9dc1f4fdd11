"""k sequences from one shared prompt, decoded together: one llama_decode per step for all of them.

The prompt's KV cells are made once (in the backend's main context, where the per-dialog prefix cache
lives), copied into a second context of the same model that holds up to MAX_SEQS sequences in one
unified KV cache, and shared there by every sequence (`llama_memory_seq_cp` adds sequence ids to the
same cells; nothing is copied). Each sequence has its own sampler chain and seed, and streams.

A sequence may have a prompt of its own (a branch): it shares the cells of what its prompt has in common with
the shared prompt, and only the rest of it is read, once for every sequence of that branch.
"""

from __future__ import annotations

import codecs
import ctypes
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

from ..prefix_cache import common_prefix_tokens as common_prefix
from ..protocol import Event, Figures, ModelError, Sampling, done_event

MAX_SEQS = 16
PREFILL = 256  # a branch's own prompt tokens read per llama_decode


def fit_sequences(k: int, n_prompt: int, max_new: int, n_ctx: int) -> tuple[int, str | None]:
    """How many of k sequences of up to max_new tokens fit beside the prompt in n_ctx, and a note if fewer."""
    if k < 1 or k > MAX_SEQS:
        raise ModelError(f"{k} sequences asked for; one batch holds 1 to {MAX_SEQS}")
    room = n_ctx - n_prompt
    fit = room // max(max_new, 1) if room > 0 else 0
    if fit < 1:
        raise ModelError(f"the prompt is {n_prompt} tokens and one reply of {max_new} more does not fit the "
                         f"model's context of {n_ctx} tokens: shorten the dialog or lower max_tokens")
    if fit >= k:
        return k, None
    return fit, (f"{fit} of {k} candidates: {k} replies of up to {max_new} tokens after a {n_prompt}-token "
                 f"prompt need {n_prompt + k * max_new} context tokens, the model holds {n_ctx}")


@dataclass
class _Seq:
    index: int
    sampling: Sampling
    max_new: int
    sampler: object = None
    decoder: object = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace"))
    text: str = ""
    emitted: int = 0
    completion: int = 0
    finish: str | None = None
    t_first: float | None = None
    t_last: float | None = None
    ttft_s: float | None = None
    next_token: int = -1
    pos: int = 0           # where its next token goes: after its own prompt, then after each token
    n_prompt: int = 0      # its prompt's tokens
    n_read: int = 0        # of those, the ones read for this sequence alone (a branch's own tokens)


class SharedPromptBatch:
    """A second llama.cpp context on the backend's loaded model, for k sequences at once."""

    def __init__(self, llm, lib):
        from llama_cpp._internals import LlamaBatch, LlamaContext

        self._lib = lib
        self.llm = llm
        params = lib.llama_context_params.from_buffer_copy(llm.context_params)
        params.n_seq_max = MAX_SEQS
        params.kv_unified = True  # the prompt's cells are shared by all sequences, not copied per sequence
        self.ctx = LlamaContext(model=llm._model, params=params, verbose=False)
        self.n_ctx = self.ctx.n_ctx()
        self._batch = LlamaBatch(n_tokens=MAX_SEQS, embd=0, n_seq_max=MAX_SEQS, verbose=False)
        self._prefill = LlamaBatch(n_tokens=PREFILL, embd=0, n_seq_max=MAX_SEQS, verbose=False)
        self._memory = lib.llama_get_memory(self.ctx.ctx)

    def close(self) -> None:
        self._batch.close()
        self._prefill.close()
        self.ctx.close()

    def _sampler(self, s: Sampling):
        lib = self._lib
        chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        add = lambda smp: lib.llama_sampler_chain_add(chain, smp)  # noqa: E731
        if s.grammar:
            add(lib.llama_sampler_init_grammar(self.llm._model.vocab, s.grammar.encode(), b"root"))
        if s.repeat_penalty != 1.0:
            add(lib.llama_sampler_init_penalties(64, s.repeat_penalty, 0.0, 0.0))
        if s.temperature <= 0:
            add(lib.llama_sampler_init_greedy())
            return chain
        if s.top_k > 0:
            add(lib.llama_sampler_init_top_k(s.top_k))
        if s.top_p < 1.0:
            add(lib.llama_sampler_init_top_p(s.top_p, 1))
        if s.min_p > 0:
            add(lib.llama_sampler_init_min_p(s.min_p, 1))
        add(lib.llama_sampler_init_temp(s.temperature))
        add(lib.llama_sampler_init_dist(s.seed & 0xFFFFFFFF))
        return chain

    def _take_prompt(self, main_ctx, n_cached: int) -> None:
        """Copy sequence 0 of the main context (the prompt but its last token) into this context's sequence 0."""
        lib = self._lib
        lib.llama_memory_clear(self._memory, True)
        if n_cached == 0:
            return
        size = lib.llama_state_seq_get_size(main_ctx, 0)
        buf = (ctypes.c_uint8 * size)()
        n = lib.llama_state_seq_get_data(main_ctx, buf, size, 0)
        if not n or lib.llama_state_seq_set_data(self.ctx.ctx, buf, n, 0) == 0:
            raise ModelError("llama.cpp could not copy the prompt's KV cells into the batch context")

    def _decode(self, entries: list[tuple[int, int, list[int]]], logits: bool = True, prefill: bool = False) -> None:
        """One llama_decode of (token, position, sequence ids) entries, logits for each (or for none)."""
        b = (self._prefill if prefill else self._batch).batch
        b.n_tokens = len(entries)
        for i, (tok, pos, seqs) in enumerate(entries):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, len(seqs), logits
            for j, s in enumerate(seqs):
                b.seq_id[i][j] = s
        rc = self._lib.llama_decode(self.ctx.ctx, b)
        if rc != 0:
            raise ModelError(f"llama.cpp could not decode the batch (llama_decode returned {rc}); the context "
                             f"may be full: ask for fewer candidates or fewer tokens")

    def _branch_heads(self, tokens: list[int], branches: dict[int, list[int]], seqs: list[_Seq]) -> list:
        """Each distinct branch prompt's cells: the shared prompt's where they agree (copied from sequence 0),
        its own tokens but the last read once for all its sequences. Returns (last token, position, sequence
        ids) per branch, for the first step's decode."""
        lib = self._lib
        shared_cells = len(tokens) - 1  # sequence 0 holds the shared prompt but its last token
        groups: dict[tuple, list[int]] = {}
        for i, b in branches.items():
            groups.setdefault(tuple(b), []).append(i)
        heads = []
        for key, ids in groups.items():
            b = list(key)
            same = min(common_prefix(tokens, b), shared_cells, len(b) - 1)
            for i in ids:
                if same:
                    lib.llama_memory_seq_cp(self._memory, 0, i, 0, same)
                seqs[i].n_prompt, seqs[i].n_read, seqs[i].pos = len(b), len(b) - same, len(b)
                seqs[i].max_new = min(seqs[i].max_new, self.n_ctx - len(b))  # a longer prompt leaves less room
            todo = [(tok, same + j, ids) for j, tok in enumerate(b[same:-1])]
            for j in range(0, len(todo), PREFILL):
                self._decode(todo[j:j + PREFILL], logits=False, prefill=True)
            heads.append((b[-1], len(b) - 1, ids))
        return heads

    def run(self, tokens: list[int], n_cached: int, main_ctx, samplings: list[Sampling], *, max_new: int,
            piece: Callable[[int], bytes], is_eog: Callable[[int], bool], stopped: Callable[[], bool],
            stop_cut: Callable, t0: float, base_figures: dict,
            branches: dict[int, list[int]] | None = None) -> Iterator[Event]:
        """Events of every sequence, each tagged with "seq": token events, then one done event per sequence.
        `branches` maps a sequence (never 0) to its own prompt's tokens."""
        lib = self._lib
        n_prompt = len(tokens)
        seqs = [_Seq(i, s, max_new, pos=n_prompt, n_prompt=n_prompt) for i, s in enumerate(samplings)]
        branches = {i: b for i, b in (branches or {}).items() if 0 < i < len(seqs) and b}
        try:
            self._take_prompt(main_ctx, n_cached)
            for q in seqs[1:]:
                if q.index not in branches:
                    lib.llama_memory_seq_cp(self._memory, 0, q.index, -1, -1)
            for q in seqs:
                q.sampler = self._sampler(q.sampling)
            t_dec = time.perf_counter()
            heads = self._branch_heads(tokens, branches, seqs)
            # The prompt's last token, once, in every sequence that shares it, and each branch's last token:
            # their logits are each sequence's first draw.
            first = [(tokens[-1], n_prompt - 1, [q.index for q in seqs if q.index not in branches])] + heads
            self._decode(first)
            rows = {i: r for r, (_, _, ids) in enumerate(first) for i in ids}
            while True:
                live = [q for q in seqs if q.finish is None]
                if not live:
                    break
                if stopped():
                    for q in live:
                        q.finish = "cancelled"
                    break
                now = time.perf_counter()
                for q in live:
                    tok = lib.llama_sampler_sample(q.sampler, self.ctx.ctx, rows[q.index])
                    if q.t_first is None:
                        q.t_first = now
                    if is_eog(tok):
                        q.finish = "stop"
                        continue
                    q.completion += 1
                    q.t_last = now
                    q.text += q.decoder.decode(piece(tok))
                    cut, hit = stop_cut(q.text, q.sampling.stop or [], q.emitted)
                    if hit:
                        q.text, q.finish = q.text[:cut], "stop"
                    if cut > q.emitted:
                        if q.ttft_s is None:
                            q.ttft_s = time.perf_counter() - t0
                        yield {"type": "token", "text": q.text[q.emitted:cut], "seq": q.index}
                        q.emitted = cut
                    if q.finish is None and q.completion >= q.max_new:
                        q.finish = "length"
                    q.next_token = tok
                live = [q for q in seqs if q.finish is None]
                if not live:
                    break
                self._decode([(q.next_token, q.pos, [q.index]) for q in live])
                for q in live:
                    q.pos += 1
                rows = {q.index: i for i, q in enumerate(live)}
            decode_s = time.perf_counter() - t_dec
            for q in seqs:
                if q.finish != "stop" or not q.sampling.stop:  # what was held back as a partial character
                    q.text += q.decoder.decode(b"", final=True)
                if len(q.text) > q.emitted:
                    yield {"type": "token", "text": q.text[q.emitted:], "seq": q.index}
                    q.emitted = len(q.text)
                yield self._done(q, t_dec, decode_s, t0, base_figures, sum(x.completion for x in seqs))
        finally:
            for q in seqs:
                if q.sampler is not None:
                    lib.llama_sampler_free(q.sampler)
            lib.llama_memory_clear(self._memory, True)

    @staticmethod
    def _done(q: _Seq, t_dec: float, batch_s: float, t0: float, base: dict, batch_tokens: int) -> Event:
        cached = base.get("cached_prompt_tokens", 0) if not q.n_read else q.n_prompt - q.n_read
        fig = Figures(prompt_tokens=q.n_prompt, cached_prompt_tokens=cached,
                      prompt_eval_s=base.get("prompt_eval_s", 0.0), completion_tokens=q.completion,
                      ttft_s=q.ttft_s, total_s=time.perf_counter() - t0)
        if q.t_last is not None:
            fig.decode_s = q.t_last - t_dec
        if fig.decode_s > 0 and q.completion:
            fig.tokens_per_s = q.completion / fig.decode_s
        extra = dict(base.get("extra", {}))
        if q.n_read:  # a branch: its own tokens read in the batch, the rest shared with the prompt
            extra.update(evaluated_prompt_tokens=q.n_read, branch=True)
        fig.extra = {**extra, "batch_decode_s": round(batch_s, 4),
                     "batch_tokens": batch_tokens,
                     "batch_tokens_per_s": round(batch_tokens / batch_s, 2) if batch_s > 0 else None}
        ev = done_event(q.text, q.finish or "length", fig)
        ev["seq"] = q.index
        return ev
