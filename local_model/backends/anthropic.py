"""Anthropic's Messages API through the `anthropic` SDK (the only backend that is sent images)."""
from __future__ import annotations

import os
from typing import Any, Iterator

from ..messages import check_messages, content_text
from .. import tool_calls
from ..protocol import Event, Figures, Message, ModelError, Sampling, ShouldStop
from .remote import RemoteBackend

DEFAULT_MODEL = "claude-sonnet-4-6"
CONTEXT_TOKENS = 200_000
_STOP_REASONS = {"end_turn": "stop", "tool_use": "stop", "stop_sequence": "stop", "max_tokens": "length",
                 "model_context_window_exceeded": "length"}


def to_anthropic(messages: list[Message], cache: bool = True) -> tuple[str | None, list[dict[str, Any]]]:
    """(system text, messages as Anthropic content blocks), same-role neighbours merged.

    With `cache`, the last block carries a cache breakpoint, so a dialog that grows at its end
    is read from Anthropic's prompt cache on the next turn.
    """
    system_parts, out = [], []
    for m in messages:
        content = m["content"] or ""
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if m["role"] == "tool":  # a tool's result: a tool_result block of the next user turn
            block = {"type": "tool_result", "tool_use_id": m["tool_call_id"], "content": content_text(content)}
            if out and out[-1]["role"] == "user":
                out[-1]["content"].append(block)
            else:
                out.append({"role": "user", "content": [block]})
            continue
        if m["role"] == "system":
            system_parts += [p["text"] if p["type"] == "text" else f"[image: {p.get('mime')}]" for p in parts]
            continue
        blocks = []
        for p in parts:
            if p["type"] == "text":
                if p["text"]:
                    blocks.append({"type": "text", "text": p["text"]})
            else:
                source = {"type": "base64", "media_type": p.get("mime") or "image/png", "data": p["data"]}
                blocks.append({"type": "image", "source": source})
        blocks += [{"type": "tool_use", "id": c["id"], "name": c["name"], "input": _input(c["arguments"])}
                   for c in tool_calls.calls_of(m)]
        if not blocks:
            continue
        if out and out[-1]["role"] == m["role"]:
            out[-1]["content"].extend(blocks)
        else:
            out.append({"role": m["role"], "content": blocks})
    if not out:
        raise ModelError("there is no user message to answer (only system text)")
    if cache:
        out[-1]["content"][-1] = {**out[-1]["content"][-1], "cache_control": {"type": "ephemeral"}}
    return ("\n\n".join(system_parts) or None), out


class AnthropicBackend(RemoteBackend):
    supports_images = True

    def __init__(self, model: str | None = None, api_key: str | None = None, base_url: str | None = None,
                 timeout_s: float = 120.0):
        key = api_key or os.environ.get("ANTHROPIC_API_KEY")
        if not key:
            raise ModelError("the Anthropic backend needs an API key: set ANTHROPIC_API_KEY (or pass api_key), "
                             "or pick a local model instead")
        try:
            import anthropic
        except ImportError as e:
            raise ModelError("the `anthropic` package is not installed: pip install anthropic") from e
        self._anthropic = anthropic
        self.model = model or DEFAULT_MODEL
        self.n_ctx = CONTEXT_TOKENS
        self.client = anthropic.Anthropic(api_key=key, base_url=base_url, max_retries=1, timeout=timeout_s)
        self.manifest = self.remote_manifest("anthropic", self.model, model, self.n_ctx, "remote (Anthropic API)",
                                             base_url or "https://api.anthropic.com")

    def _request(self, messages: list[Message], s: Sampling, cache_key: str | None) -> dict[str, Any]:
        system, msgs = to_anthropic(messages, cache=cache_key is not None)
        req: dict[str, Any] = {"model": self.model, "messages": msgs, "stream": True,
                               "max_tokens": s.max_tokens if s.max_tokens > 0 else 4096}
        if system:
            req["system"] = system
        # The SDK no longer types sampling parameters and recent models refuse some of them (and
        # temperature with top_p together), so only values that depart from the defaults are sent.
        extra: dict[str, Any] = {}
        if s.top_p < 1.0:
            extra["top_p"] = s.top_p
        elif s.temperature != Sampling.temperature:
            extra["temperature"] = s.temperature
        if s.top_k > 0:
            extra["top_k"] = s.top_k
        if extra:
            req["extra_body"] = extra
        if s.stop:
            req["stop_sequences"] = list(s.stop)
        if s.tools:
            req["tools"] = [{"name": t["name"], "description": t.get("description") or "",
                             "input_schema": t.get("parameters") or {"type": "object"}} for t in s.tools]
            req["tool_choice"] = {"type": "any" if s.tool_choice == "required" else "auto"}
        return req

    def _error(self, e: Exception) -> ModelError:
        a = self._anthropic
        if isinstance(e, a.AuthenticationError):
            return ModelError(f"Anthropic rejected the API key (401: {_message(e)}): check ANTHROPIC_API_KEY")
        if isinstance(e, a.PermissionDeniedError):
            return ModelError(f"Anthropic refused the request (403: {_message(e)}): check the key's permissions")
        if isinstance(e, a.APIStatusError):
            return ModelError(f"Anthropic answered {e.status_code}: {_message(e)}")
        if isinstance(e, a.APIConnectionError):
            return ModelError(f"cannot reach the Anthropic API at {self.manifest['base_url']}: {e}")
        return ModelError(f"the Anthropic request failed: {type(e).__name__}: {e}")

    def stream(self, messages: list[Message], sampling: Sampling | None = None, cache_key: str | None = None,
               should_stop: ShouldStop | None = None) -> Iterator[Event]:
        s = sampling or Sampling()
        check_messages(messages)
        yield from self._stream(lambda: self.client.messages.create(**self._request(messages, s, cache_key)),
                                _pieces, should_stop)


def _pieces(events, fig: Figures, state: dict) -> Iterator[str | None]:
    """The text of each event of a Messages stream; usage and the stop reason go to fig and state."""
    for ev in events:
        kind = getattr(ev, "type", None)
        if kind == "message_start":
            u = ev.message.usage
            cached = getattr(u, "cache_read_input_tokens", None) or 0
            created = getattr(u, "cache_creation_input_tokens", None) or 0
            fig.prompt_tokens = (u.input_tokens or 0) + cached + created
            fig.cached_prompt_tokens = cached
        elif kind == "content_block_delta" and getattr(ev.delta, "type", None) == "text_delta":
            yield ev.delta.text
            continue
        elif kind == "content_block_start" and getattr(ev.content_block, "type", None) == "tool_use":
            state.setdefault("tool_calls", []).append(
                {"id": ev.content_block.id, "name": ev.content_block.name, "arguments": ""})
        elif kind == "content_block_delta" and getattr(ev.delta, "type", None) == "input_json_delta":
            if state.get("tool_calls"):
                state["tool_calls"][-1]["arguments"] += ev.delta.partial_json or ""
        elif kind == "message_delta":
            if getattr(ev, "usage", None) is not None and ev.usage.output_tokens is not None:
                fig.completion_tokens = ev.usage.output_tokens
            reason = getattr(ev.delta, "stop_reason", None)
            if reason:
                state["finish"] = _STOP_REASONS.get(reason, "stop")
        yield None


def _message(e: Exception) -> str:
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
    return str(getattr(e, "message", None) or e)


def _input(arguments: str):
    """A call's arguments as the tool_use block's input object (text that is not an object goes under "text")."""
    value = tool_calls.arguments_object(arguments)
    return value if isinstance(value, dict) else {"text": arguments}
