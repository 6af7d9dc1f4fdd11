"""What the two remote backends share: the manifest, a token estimate, concurrent candidates, and the
tail of a stream (timing, Stop, an error after the first token kept in the done event)."""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Iterable, Iterator

from ..messages import messages_text
from ..protocol import Event, Figures, Message, ModelError, Sampling, ShouldStop, done_event, token_event
from .many import concurrent_streams
from .. import tool_calls


class RemoteBackend:
    """Base of a backend whose model runs elsewhere, behind an SDK client (`self.client`)."""

    supports_images = False
    client: Any
    manifest: dict[str, Any]

    @staticmethod
    def remote_manifest(backend: str, model: str, requested: str | None, n_ctx: int, gpu: str,
                        base_url: str) -> dict[str, Any]:
        return {"backend": backend, "model": model, "requested": requested, "file_name": None, "sha256": None,
                "quant": None, "chat_template_hash": None, "llama_cpp_version": None, "n_ctx": n_ctx,
                "n_gpu_layers": None, "flash_attn": None, "gpu": gpu, "lora": None, "base_url": base_url}

    def count_tokens(self, messages_or_text: list[Message] | str) -> int:
        """An estimate (about 3.5 characters a token): the server's tokenizer is not ours to call."""
        return math.ceil(len(messages_text(messages_or_text)) / 3.5)

    def _error(self, e: Exception) -> ModelError:
        raise NotImplementedError

    def _stream(self, open_stream: Callable[[], Any], pieces: Callable[[Any, Figures, dict], Iterable[str | None]],
                should_stop: ShouldStop | None, finish: str | None = "stop",
                after: Callable[[Figures, dict], None] | None = None) -> Iterator[Event]:
        """Token events, then one done event. `pieces` yields the text of each server event (None for
        events without text) and may set state["finish"]; `after` finishes the figures."""
        t0 = time.perf_counter()
        try:
            stream = open_stream()
        except Exception as e:  # noqa: BLE001
            raise self._error(e) from e
        fig, state = Figures(), {"finish": finish}
        text, error = "", None
        t_first = t_last = None
        try:
            for piece in pieces(stream, fig, state):
                if piece:
                    now = time.perf_counter()
                    if t_first is None:
                        t_first = now
                        fig.ttft_s = now - t0
                    t_last = now
                    text += piece
                    yield token_event(piece)
                if should_stop is not None and should_stop():
                    state["finish"] = "cancelled"
                    break
        except ModelError:
            raise
        except Exception as e:  # noqa: BLE001
            if t_first is None:
                raise self._error(e) from e
            state["finish"], error = "error", str(self._error(e))
        finally:
            stream.close()
        if after is not None:
            after(fig, state)
        fig.set_stream_timing(t0, t_first, t_last, time.perf_counter())
        done = done_event(text, state["finish"] or "stop", fig, error)
        if state.get("tool_calls"):
            done["tool_calls"] = [tool_calls.call(c["name"], c["arguments"] or "{}", c["id"] or None)
                                  for c in state["tool_calls"]]
        yield done

    def stream_many(self, messages: list[Message], samplings: list[Sampling], cache_key: str | None = None,
                    should_stop: ShouldStop | None = None,
                    seq_messages: list[list[Message] | None] | None = None) -> Iterator[Event]:
        """k replies at once: concurrent requests, which a server with parallel slots decodes as one batch."""
        return concurrent_streams(self, messages, samplings, should_stop, seq_messages)

    def close(self) -> None:
        self.client.close()
