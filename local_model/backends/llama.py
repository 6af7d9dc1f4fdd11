"""The in-process llama.cpp backend: one GGUF model, streaming, KV-cache reuse across dialogs."""
from __future__ import annotations

import codecs
import ctypes
import hashlib
import threading
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator


from .. import gpu
from .batch import SharedPromptBatch, fit_sequences
from ..cpu_buffers import extra_buffers
from ..threads import adaptive, choose_threads, runnable_elsewhere, threads_now
from ..gguf import cached_sha256, read_metadata
from ..messages import check_messages, text_only
from ..prefix_cache import (
    HistoryLRU, SavedState, StateLRU, TokenHistory, common_prefix_tokens, splice_prompt,
)
from ..protocol import Event, Figures, Message, ModelError, Sampling, ShouldStop, done_event, token_event
from ..registry import ResolvedModel, install_command, sha_cache_file
from .. import tool_calls

# Used only when a GGUF carries no chat template of its own.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


_DEFAULT_PARAMS_SWAP = threading.Lock()


@contextmanager
def no_extra_buffers():
    """While inside, every llama_cpp.Llama is built without the CPU's extra buffer types.

    Llama() has no argument for `use_extra_bufts`, so its default model params are swapped meanwhile.
    """
    from llama_cpp import llama_cpp as lib

    default = lib.llama_model_default_params

    def without_extra_bufts():
        params = default()
        params.use_extra_bufts = False
        return params

    with _DEFAULT_PARAMS_SWAP:
        lib.llama_model_default_params = without_extra_bufts
        try:
            yield
        finally:
            lib.llama_model_default_params = default


def new_llama(*, extra_buffers: bool | None = None, **kwargs):
    """llama_cpp.Llama(**kwargs), with the CPU's extra buffer types only where they are safe (see cpu_buffers).

    A LoRA adapter never gets them: over AMX-repacked weights it segfaults at the first evaluation
    ("lora for 'blk.0.attn_k.weight' cannot use buft 'AMX'").
    """
    import llama_cpp

    if extra_buffers_for(extra_buffers, kwargs.get("lora_path"))[0]:
        return llama_cpp.Llama(**kwargs)
    with no_extra_buffers():
        return llama_cpp.Llama(**kwargs)


def extra_buffers_for(wanted: bool | None, lora_path) -> tuple[bool, str]:
    if lora_path is not None:
        return False, "CPU extra buffer types off: a LoRA adapter is loaded"
    return extra_buffers(wanted)


def _ftype_names() -> dict[int, str]:
    import llama_cpp

    return {v: k.removeprefix("LLAMA_FTYPE_").removeprefix("MOSTLY_").removeprefix("ALL_")
            for k, v in vars(llama_cpp).items() if k.startswith("LLAMA_FTYPE_") and isinstance(v, int)}


class LlamaBackend:
    """A GGUF model run in this process by llama-cpp-python."""

    supports_images = False

    def __init__(self, resolved: ResolvedModel, *, n_ctx: int = 4096, n_gpu_layers: int | None = None,
                 flash_attn: bool | None = None, lora_path: str | None = None, cache_bytes: int = 2 << 30,
                 verbose: bool = False, n_threads: int | None = None, n_threads_batch: int | None = None,
                 n_batch: int = 512, data_dir: str | None = None, extra_buffers: bool | None = None):
        import llama_cpp

        # llama.cpp's backends (CUDA) load first: on an H100 with CUDA 13, loading them after the chat
        # formatter import and the GGUF header read segfaulted; this order ran every eval there.
        offload = gpu.gpu_offload_supported()
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        path = resolved.path
        hint = (f"Reinstall it with `{install_command(resolved.name)}`." if resolved.name
                else f"Check the file, or use the default model (`{install_command('default')}`).")
        try:
            meta = read_metadata(path)
        except ModelError as e:
            raise ModelError(f"{e}. {hint}") from e
        self.plan = gpu.choose(meta, path.stat().st_size, n_ctx, n_gpu_layers, flash_attn, supported=offload)
        self._adaptive_threads = adaptive(n_threads, n_threads_batch)
        n_threads, n_threads_batch, threads_reason = choose_threads(n_threads, n_threads_batch)
        self._most_threads = (n_threads, n_threads_batch)
        self._threads_set: dict[int, tuple[int, int]] = {}
        if lora_path is not None and not Path(lora_path).is_file():
            raise ModelError(f"LoRA adapter {lora_path} does not exist; train or export one first")
        self._extra_buffers = extra_buffers_for(extra_buffers, lora_path)
        try:
            self.llm = new_llama(
                extra_buffers=self._extra_buffers[0], model_path=str(path), n_ctx=n_ctx, n_batch=n_batch,
                n_gpu_layers=self.plan.n_gpu_layers, flash_attn=self.plan.flash_attn, lora_path=lora_path,
                verbose=verbose, n_threads=n_threads, n_threads_batch=n_threads_batch,
            )
        except (ValueError, RuntimeError, OSError) as e:
            raise ModelError(f"llama.cpp could not load {path}: {e}. The file may be truncated or corrupt. {hint}") from e

        self._lib = llama_cpp
        self._vocab = self.llm._model.vocab
        self.n_ctx = self.llm.n_ctx()
        self.n_batch = self.llm.n_batch
        model = self.llm._model
        bos_id, eos_id = self.llm.token_bos(), self.llm.token_eos()
        self._bos_text = model.token_get_text(bos_id) if bos_id != -1 else ""
        self._bos_id = bos_id
        self._add_bos = bool(model.add_bos_token()) and bos_id != -1
        template = self.llm.metadata.get("tokenizer.chat_template") or CHATML_TEMPLATE
        # Qwen2.5's template (and others like it) renders `tools` and tool turns itself; others get the text protocol.
        self.native_tools = "tools" in template and "tool_call" in template
        self._formatter = Jinja2ChatFormatter(
            template=template, eos_token=model.token_get_text(eos_id) if eos_id != -1 else "",
            bos_token=self._bos_text, add_generation_prompt=True,
        )
        self._piece_buf = ctypes.create_string_buffer(256)
        self._pieces: dict[tuple[int, bool], bytes] = {}
        self._lock = threading.Lock()  # one llama.cpp context: one generation at a time
        self._states = StateLRU(cache_bytes)
        self._histories = HistoryLRU()
        self._batch: SharedPromptBatch | None = None  # made on the first request for several sequences
        self._ghost = None  # the ghost-text completer's own context, made on the first completion at a cursor
        self._ghost_lock = threading.Lock()
        self._ghost_closed = False
        self._live_key: str | None = None

        ftype = meta.get("general.file_type")
        quant = _ftype_names().get(int(ftype)) if ftype is not None else None
        self.manifest: dict[str, Any] = {
            "backend": "llama",
            "model": resolved.name or path.stem,
            "requested": resolved.requested,
            "file_name": path.name,
            "path": str(path),
            "sha256": cached_sha256(path, sha_cache_file(data_dir)),
            "quant": quant,
            "chat_template_hash": hashlib.sha256(template.encode()).hexdigest(),
            "llama_cpp_version": llama_cpp.__version__,
            "n_ctx": self.n_ctx,
            "n_gpu_layers": self.plan.n_gpu_layers,
            "flash_attn": self.plan.flash_attn,
            "gpu": self.plan.reason,
            "lora": str(lora_path) if lora_path else None,
            "n_threads": self.llm.n_threads,
            "n_threads_batch": self.llm.n_threads_batch,
            "threads": threads_reason,
            "cpu_buffers": self._extra_buffers[1],
            "note": resolved.note,
        }

    # --- text and tokens ---------------------------------------------------------------

    def render(self, messages: list[Message], tools: list[dict] | None = None) -> str:
        """The chat prompt text, from the GGUF's own template; `tools` (specs) offered through the template when it
        renders tools, else described in the prompt's own user turn (so the cached prefix before it stays)."""
        check_messages(messages)
        msgs, extra = text_only(messages), {}
        if self.native_tools:
            for m in msgs:
                if m.get("tool_calls"):
                    m["tool_calls"] = [{**c, "function": {**c["function"], "arguments": tool_calls.arguments_object(
                        c["function"]["arguments"])}} for c in m["tool_calls"]]
            if tools:
                extra["tools"] = tool_calls.openai_tools(tools)
        else:
            if tools:
                last = max(i for i, m in enumerate(msgs) if m["role"] in ("user", "system"))
                msgs[last] = {**msgs[last], "content": msgs[last]["content"] + "\n\n" +
                              tool_calls.describe(tools)}
            msgs = tool_calls.as_text_messages(msgs)
        try:
            return self._formatter(messages=msgs, **extra).prompt
        except Exception as e:  # noqa: BLE001 - jinja raises many kinds
            raise ModelError(f"the model's chat template rejected these messages: {e}") from e

    def _tokenize(self, text: bytes, at_start: bool = True) -> list[int]:
        add_bos = at_start and self._add_bos and not text.startswith(self._bos_text.encode())
        return self.llm.tokenize(text, add_bos=add_bos, special=True)

    def _piece(self, token: int, special: bool = True) -> bytes:
        key = (token, special)
        p = self._pieces.get(key)
        if p is None:
            n = self._lib.llama_token_to_piece(self._vocab, token, self._piece_buf, len(self._piece_buf), 0, special)
            if n < 0:
                self._piece_buf = ctypes.create_string_buffer(-n)
                n = self._lib.llama_token_to_piece(self._vocab, token, self._piece_buf, len(self._piece_buf), 0, special)
            p = self._piece_buf.raw[:n]
            self._pieces[key] = p
        return p

    def count_tokens(self, messages_or_text: list[Message] | str) -> int:
        if isinstance(messages_or_text, str):
            return len(self.llm.tokenize(messages_or_text.encode(), add_bos=False, special=False))
        return len(self._tokenize(self.render(messages_or_text).encode()))

    # --- KV state per cache key --------------------------------------------------------

    def _save_live(self) -> float:
        """Serialize the live context's KV cells into the LRU under its key; returns seconds."""
        if self._live_key is None or self.llm.n_tokens == 0:
            return 0.0
        t = time.perf_counter()
        ctx = self.llm.ctx
        size = self._lib.llama_state_seq_get_size(ctx, 0)
        buf = (ctypes.c_uint8 * size)()
        n = self._lib.llama_state_seq_get_data(ctx, buf, size, 0)
        if n:
            self._states.put(self._live_key, SavedState(buf, int(n), self.llm.input_ids[: self.llm.n_tokens].copy()))
        return time.perf_counter() - t

    def _restore(self, state: SavedState) -> bool:
        mem = self._lib.llama_get_memory(self.llm.ctx)
        self._lib.llama_memory_clear(mem, False)
        if self._lib.llama_state_seq_set_data(self.llm.ctx, state.buf, state.size, 0) == 0:
            self.llm.reset()
            self._lib.llama_memory_clear(mem, False)
            return False
        n = len(state.tokens)
        self.llm.input_ids[:n] = state.tokens
        self.llm.n_tokens = n
        self.llm._requires_eval = True
        return True

    def _prepare_context(self, cache_key: str | None, tokens: list[int]) -> dict[str, Any]:
        """Make the live context hold the longest available prefix of `tokens`."""
        info: dict[str, Any] = {"kv": "live", "state_save_s": 0.0, "state_restore_s": 0.0}
        if self._live_key == cache_key and cache_key is not None:
            return info
        live_match = common_prefix_tokens(self.llm.input_ids[: self.llm.n_tokens], tokens)
        saved = self._states.get(cache_key) if cache_key is not None else None
        # The live context belongs to another dialog and is about to be overwritten: keep it.
        if self._live_key is not None:
            info["state_save_s"] = self._save_live()
        if saved is not None and common_prefix_tokens(saved.tokens, tokens) > live_match:
            t = time.perf_counter()
            if self._restore(saved):
                info["kv"] = "restored"
            self._states.pop(cache_key)
            info["state_restore_s"] = time.perf_counter() - t
        else:
            info["kv"] = "shared-prefix" if live_match else "fresh"
        return info

    # --- generation ---------------------------------------------------------------------

    def stream(self, messages: list[Message], sampling: Sampling | None = None, cache_key: str | None = None,
               should_stop: ShouldStop | None = None) -> Iterator[Event]:
        sampling = sampling or Sampling()
        t0 = time.perf_counter()
        prompt = self.render(messages, sampling.tools).encode()
        if sampling.tools and sampling.tool_choice == "required" and not sampling.grammar:
            sampling = replace(sampling, grammar=tool_calls.call_grammar(sampling.tools))
        with self._lock:
            for ev in self._generate(prompt, sampling, cache_key, should_stop, t0):
                yield tool_calls.with_calls(ev, sampling.tools) if sampling.tools and ev["type"] == "done" else ev

    def _prompt_ready(self, prompt: bytes, cache_key: str | None) -> tuple[list[int], dict[str, Any], int]:
        """(prompt tokens, cache info, tokens the live context holds already), the live context made ready."""
        llm = self.llm
        history = self._histories.get(cache_key) if cache_key is not None else None
        tokens = splice_prompt(history, prompt, self._tokenize)
        n_prompt = len(tokens)
        if n_prompt >= self.n_ctx:
            raise ModelError(
                f"the prompt is {n_prompt} tokens but the model's context holds {self.n_ctx} (n_ctx): "
                f"shorten the dialog (skip or unpin cells, or lower the context budget) or load the "
                f"model with a larger n_ctx"
            )
        info = self._prepare_context(cache_key, tokens)
        self._live_key = cache_key
        # Reuse the longest prefix the live context holds; always evaluate at least one prompt token
        # so the logits we sample from belong to this prompt.
        reuse = min(common_prefix_tokens(llm.input_ids[: llm.n_tokens], tokens), n_prompt - 1)
        if reuse < llm.n_tokens:
            if not llm._ctx.kv_cache_seq_rm(-1, reuse, -1):
                llm.reset()
                self._lib.llama_memory_clear(self._lib.llama_get_memory(llm.ctx), False)
                reuse = 0
            llm.n_tokens = reuse
        return tokens, info, reuse

    def _threads_for(self, ctx) -> int:
        """Set this generation's threads on a context (fewer while other work runs); returns decode threads."""
        counts = self._most_threads
        if self._adaptive_threads:
            busy = runnable_elsewhere()
            counts = (threads_now(counts[0], busy), threads_now(counts[1], busy))
        if self._threads_set.get(id(ctx)) != counts:
            self._lib.llama_set_n_threads(ctx, *counts)
            self._threads_set[id(ctx)] = counts
        return counts[0]

    def _eval_prompt(self, todo: list[int], stopped) -> bool:
        """Read prompt tokens into the live context in batches, so that Stop also works during a long prompt."""
        for i in range(0, len(todo), self.n_batch):
            if stopped():
                return False
            try:
                self.llm.eval(todo[i:i + self.n_batch])
            except Exception as e:  # noqa: BLE001
                raise ModelError(f"llama.cpp failed while reading the prompt: {e}") from e
        return True

    def _remember(self, cache_key: str | None) -> None:
        if cache_key is not None:
            self._histories.remember(cache_key, TokenHistory.build(
                self.llm.input_ids[: self.llm.n_tokens].tolist(), self._piece,
                implicit_bos=self._bos_id if self._add_bos else None))

    def stream_many(self, messages: list[Message], samplings: list[Sampling], cache_key: str | None = None,
                    should_stop: ShouldStop | None = None,
                    seq_messages: list[list[Message] | None] | None = None) -> Iterator[Event]:
        """k replies to one prompt, decoded in one batch (see batch.py). Every event carries "seq";
        a {"type": "note"} comes first when fewer than k fit the context. `seq_messages[i]` (i > 0) is
        sequence i's own prompt: only the tokens after what it shares with `messages` are read for it."""
        t0 = time.perf_counter()
        prompt = self.render(messages).encode()
        own = [self.render(m).encode() if m is not None and i > 0 else None
               for i, m in enumerate(seq_messages or [])]
        with self._lock:
            yield from self._generate_many(prompt, samplings, cache_key, should_stop, t0, own)

    def _generate_many(self, prompt: bytes, samplings: list[Sampling], cache_key: str | None,
                       should_stop: ShouldStop | None, t0: float,
                       own: list[bytes | None] | None = None) -> Iterator[Event]:
        stopped = _stopper(should_stop)
        tokens, info, reuse = self._prompt_ready(prompt, cache_key)
        n_prompt = len(tokens)
        branches = {i: self._tokenize(p) for i, p in enumerate(own or []) if p is not None and p != prompt}
        for i, b in branches.items():
            if len(b) >= self.n_ctx:
                raise ModelError(f"sequence {i}'s prompt is {len(b)} tokens but the model's context holds "
                                 f"{self.n_ctx} (n_ctx): shorten it or load the model with a larger n_ctx")
        # The KV cells a batch needs: the shared prompt, each distinct branch's own tokens, then the replies.
        n_cells = n_prompt + sum(len(b) - common_prefix_tokens(tokens, b)
                                 for b in {tuple(b): b for b in branches.values()}.values())
        longest = max(s.max_tokens for s in samplings)
        max_new = self.n_ctx - n_prompt if longest <= 0 else min(longest, self.n_ctx - n_prompt)
        k, note = fit_sequences(len(samplings), min(n_cells, self.n_ctx - 1), max_new, self.n_ctx)
        if note:
            yield {"type": "note", "text": note}
            for seq in range(k, len(samplings)):  # every sequence asked for ends with a done event
                yield {**done_event("", "error", Figures(prompt_tokens=n_prompt), error=note), "seq": seq}
        samplings = samplings[:k]
        info["threads"] = self._threads_for(self.llm.ctx)
        t_eval = time.perf_counter()
        try:
            read = self._eval_prompt(tokens[reuse:-1], stopped)
        finally:
            self._remember(cache_key)
        base = {"cached_prompt_tokens": reuse, "prompt_eval_s": time.perf_counter() - t_eval,
                "extra": {"evaluated_prompt_tokens": n_prompt - reuse, "batch_sequences": k,
                          **{k2: (round(v, 4) if isinstance(v, float) else v) for k2, v in info.items()}}}
        if not read:
            for i in range(k):
                ev = done_event("", "cancelled", Figures(prompt_tokens=n_prompt, cached_prompt_tokens=reuse))
                ev["seq"] = i
                yield ev
            return
        if self._batch is None:
            self._batch = SharedPromptBatch(self.llm, self._lib)
        self._threads_for(self._batch.ctx.ctx)
        yield from self._batch.run(
            tokens, n_prompt - 1, self.llm.ctx, samplings, max_new=max_new,
            branches={i: b for i, b in branches.items() if i < k},
            piece=lambda tok: self._piece(tok, special=False),
            is_eog=lambda tok: bool(self._lib.llama_vocab_is_eog(self._vocab, tok)),
            stopped=stopped, stop_cut=_stop_cut, t0=t0, base_figures=base)

    def _generate(self, prompt: bytes, s: Sampling, cache_key: str | None, should_stop: ShouldStop | None,
                  t0: float) -> Iterator[Event]:
        llm = self.llm
        stopped = _stopper(should_stop)
        tokens, info, reuse = self._prompt_ready(prompt, cache_key)
        n_prompt = len(tokens)
        fig = Figures(prompt_tokens=n_prompt, cached_prompt_tokens=reuse)
        info["threads"] = self._threads_for(llm.ctx)

        text, emitted, finish, error = "", 0, "length", None
        completion = 0
        t_first = t_last = None
        gen = None
        t_eval = time.perf_counter()
        try:
            if not self._eval_prompt(tokens[reuse:-1], stopped):
                finish = "cancelled"
            fig.prompt_eval_s = time.perf_counter() - t_eval
            t_dec = time.perf_counter()
            if finish != "cancelled" and not stopped():
                llm.set_seed(s.seed)
                grammar = None
                if s.grammar:
                    from llama_cpp import LlamaGrammar
                    grammar = LlamaGrammar.from_string(s.grammar, verbose=False)
                gen = llm.generate(tokens, top_k=s.top_k, top_p=s.top_p, min_p=s.min_p, typical_p=1.0,
                                   temp=s.temperature, repeat_penalty=s.repeat_penalty, reset=True, grammar=grammar)
                max_new = self.n_ctx - n_prompt if s.max_tokens <= 0 else min(s.max_tokens, self.n_ctx - n_prompt)
                stops = [x for x in (s.stop or []) if x]
                decoder = codecs.getincrementaldecoder("utf-8")("replace")
                hit = False
                for tok in gen:
                    now = time.perf_counter()
                    if t_first is None:
                        t_first = now
                    if self._lib.llama_vocab_is_eog(self._vocab, tok):
                        finish = "stop"
                        break
                    completion += 1
                    t_last = now
                    text += decoder.decode(self._piece(tok, special=False))
                    cut, hit = _stop_cut(text, stops, emitted)
                    if hit:
                        text, finish = text[:cut], "stop"
                    if cut > emitted:
                        if fig.ttft_s is None:
                            fig.ttft_s = time.perf_counter() - t0
                        yield token_event(text[emitted:cut])
                        emitted = cut
                    if hit:
                        break
                    if completion >= max_new:
                        finish = "length"
                        break
                    if stopped():
                        finish = "cancelled"
                        break
                if not hit:  # flush what was held back as a possible stop sequence or partial character
                    text += decoder.decode(b"", final=True)
                    if len(text) > emitted:
                        if fig.ttft_s is None:
                            fig.ttft_s = time.perf_counter() - t0
                        yield token_event(text[emitted:])
                        emitted = len(text)
            fig.decode_s = (t_last - t_dec) if t_last is not None else 0.0
        except ModelError:
            raise
        except Exception as e:  # noqa: BLE001 - report it in the done event, keep the partial text
            finish, error = "error", f"{type(e).__name__}: {e}"
        finally:
            if gen is not None:
                gen.close()
            self._remember(cache_key)
        fig.completion_tokens = completion
        fig.total_s = time.perf_counter() - t0
        if fig.ttft_s is None and t_first is not None:
            fig.ttft_s = t_first - t0
        if fig.decode_s > 0 and completion:
            fig.tokens_per_s = completion / fig.decode_s
        fig.extra = {
            "evaluated_prompt_tokens": n_prompt - reuse,
            **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in info.items()},
            "cached_states": len(self._states),
            "cached_state_bytes": self._states.total_bytes,
        }
        yield done_event(text, finish, fig, error)

    def ghost(self):
        """The completer of ghost text (local_model/ghost.py): its own context on this model, made once."""
        from ..ghost import GhostCompleter

        with self._ghost_lock:
            if self._ghost_closed:
                raise ModelError("this model was closed (swapped for another); ask again")
            if self._ghost is None:
                self._ghost = GhostCompleter(self)
            return self._ghost

    def close(self) -> None:
        with self._ghost_lock:
            self._ghost_closed = True
            if self._ghost is not None:
                self._ghost.close()
                self._ghost = None
        with self._lock:
            if self._batch is not None:
                self._batch.close()
            self.llm.close()


def _stopper(should_stop: ShouldStop | None):
    def stopped() -> bool:
        if should_stop is None:
            return False
        try:
            return bool(should_stop())
        except Exception:  # noqa: BLE001 - a broken callback must not kill the generation
            return False
    return stopped


def _stop_cut(text: str, stops: list[str], emitted: int) -> tuple[int, bool]:
    """(how much of text may be shown, whether a stop sequence was hit)."""
    if not stops:
        return len(text), False
    longest = max(len(x) for x in stops)
    start = max(0, emitted - longest)
    found = [i for x in stops if (i := text.find(x, start)) >= 0]
    if found:
        return min(found), True
    # Hold back a tail that could be the start of a stop sequence.
    hold = 0
    for x in stops:
        for k in range(min(len(x) - 1, len(text)), 0, -1):
            if text.endswith(x[:k]):
                hold = max(hold, k)
                break
    return len(text) - hold, False
