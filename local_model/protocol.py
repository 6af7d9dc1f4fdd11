"""The one small protocol every backend speaks: messages in, token events and a done event out."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Protocol, runtime_checkable

# A message is OpenAI chat shaped: {"role": "system"|"user"|"assistant", "content": str | [parts]},
# where a part is {"type": "text", "text": ...} or {"type": "image", "mime": ..., "data": base64}.
Message = dict[str, Any]
Event = dict[str, Any]
ShouldStop = Callable[[], bool]

FINISH_REASONS = ("stop", "length", "cancelled", "error")


class ModelError(Exception):
    """A model could not be loaded or could not answer; the message says what to do next."""


@dataclass
class Sampling:
    """Sampling parameters; the defaults give greedy, reproducible output."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    repeat_penalty: float = 1.0
    seed: int = 0
    max_tokens: int = 512
    stop: list[str] | None = None
    grammar: str | None = None  # GBNF (root rule "root"): the local llama backend samples only what it allows
    tools: list[dict[str, Any]] | None = None  # tool specs offered (tool_calls.py); calls come in the done event
    tool_choice: str = "auto"  # "required": the reply must call one of the tools

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "Sampling":
        """Build from a dict, ignoring unknown keys (so stored records stay loadable)."""
        known = {k: v for k, v in (d or {}).items() if k in cls.__dataclass_fields__}
        return cls(**known)


@dataclass
class Figures:
    """Timings and token counts of one generation."""

    ttft_s: float | None = None
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    prompt_eval_s: float = 0.0
    completion_tokens: int = 0
    decode_s: float = 0.0
    tokens_per_s: float | None = None
    total_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def set_stream_timing(self, t0: float, t_first: float | None, t_last: float | None, now: float) -> None:
        """Remote backends: the server's prompt and decode time, read off when the first and last tokens came."""
        self.total_s = now - t0
        if t_first is not None and t_last is not None:
            self.prompt_eval_s = self.ttft_s or 0.0
            self.decode_s = t_last - t_first
            if self.decode_s > 0 and self.completion_tokens > 1:
                self.tokens_per_s = (self.completion_tokens - 1) / self.decode_s

    def as_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k != "extra"}
        if self.tokens_per_s is None and self.decode_s > 0 and self.completion_tokens:
            d["tokens_per_s"] = self.completion_tokens / self.decode_s
        for k in ("ttft_s", "prompt_eval_s", "decode_s", "total_s", "tokens_per_s"):
            if isinstance(d[k], float):
                d[k] = round(d[k], 4)
        d.update(self.extra)
        return d


def token_event(text: str) -> Event:
    return {"type": "token", "text": text}


def done_event(text: str, finish_reason: str, figures: Figures | dict, error: str | None = None) -> Event:
    ev = {
        "type": "done",
        "text": text,
        "finish_reason": finish_reason,
        "figures": figures.as_dict() if isinstance(figures, Figures) else figures,
    }
    if error:
        ev["error"] = error
    return ev


@runtime_checkable
class Backend(Protocol):
    """What the engine and the app rely on.

    `stream` raises ModelError before its first event when the request cannot be served (context
    over n_ctx, server down, key rejected). Once it has started it always ends with exactly one
    done event; a failure after that point ends with finish_reason "error" and an "error" text.
    """

    manifest: dict[str, Any]
    supports_images: bool
    n_ctx: int

    def count_tokens(self, messages_or_text: list[Message] | str) -> int: ...

    def stream(
        self,
        messages: list[Message],
        sampling: Sampling | None = None,
        cache_key: str | None = None,
        should_stop: ShouldStop | None = None,
    ) -> Iterator[Event]: ...

    def close(self) -> None: ...
