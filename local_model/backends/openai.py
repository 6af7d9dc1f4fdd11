"""Any OpenAI-compatible chat server (llama.cpp's, vLLM, Ollama...) through the `openai` SDK."""
from __future__ import annotations

from typing import Any, Iterator
from urllib.parse import urlparse

from ..messages import check_messages, text_only
from ..protocol import Event, Figures, Message, ModelError, Sampling, ShouldStop
from .remote import RemoteBackend
from .. import tool_calls

_FINISH = {"stop": "stop", "length": "length", "content_filter": "stop", "tool_calls": "stop"}


def normalize_base_url(base_url: str) -> str:
    """A bare host (http://host:port) gets the usual /v1."""
    u = urlparse(base_url)
    if not u.scheme or not u.netloc:
        raise ModelError(f"base_url {base_url!r} is not a URL like http://127.0.0.1:8080/v1")
    return base_url.rstrip("/") + "/v1" if u.path in ("", "/") else base_url.rstrip("/")


class OpenAIBackend(RemoteBackend):

    def __init__(self, base_url: str, model: str | None = None, api_key: str | None = None,
                 n_ctx: int = 4096, timeout_s: float = 120.0):
        try:
            import openai
        except ImportError as e:
            raise ModelError("the `openai` package is not installed: pip install openai") from e
        self._openai = openai
        self.base_url = normalize_base_url(base_url)
        self.n_ctx = n_ctx
        # Local servers ignore the key, but the SDK insists on one.
        self.client = openai.OpenAI(base_url=self.base_url, api_key=api_key or "not-needed",
                                    timeout=timeout_s, max_retries=0)
        self.model = model or self._first_model()
        self.manifest = self.remote_manifest("openai", self.model, model, n_ctx,
                                             f"remote (OpenAI-compatible server at {self.base_url})", self.base_url)

    def _first_model(self) -> str:
        try:
            models = list(self.client.models.list())
            ids = [m.id for m in models if isinstance(getattr(m, "id", None), str)]
        except Exception as e:  # noqa: BLE001
            raise self._error(e, "listing its models") from e
        if not ids:
            raise ModelError(f"the server at {self.base_url} lists no models (GET /models); "
                             f"is it an OpenAI-compatible server? Pass the model name explicitly")
        return ids[0]

    def _error(self, e: Exception, doing: str = "asking for a reply") -> ModelError:
        o = self._openai
        where = f"the OpenAI-compatible server at {self.base_url}"
        if isinstance(e, o.APITimeoutError):
            return ModelError(f"{where} did not answer in time while {doing}")
        if isinstance(e, o.APIConnectionError):
            return ModelError(f"cannot reach {where} while {doing}: is it running? ({e.__cause__ or e})")
        if isinstance(e, o.AuthenticationError):
            return ModelError(f"{where} rejected the API key (401): pass the right api_key")
        if isinstance(e, o.APIStatusError):
            body = (e.response.text or "")[:200] if e.response is not None else ""
            return ModelError(f"{where} answered HTTP {e.status_code} while {doing}: {body!r}")
        return ModelError(f"{where} answered something that is not an OpenAI-compatible response "
                          f"while {doing} ({type(e).__name__}: {str(e)[:200]})")

    def _request(self, messages: list[Message], s: Sampling) -> dict[str, Any]:
        req: dict[str, Any] = {
            "model": self.model, "stream": True,
            "messages": [{k: v for k, v in m.items() if not (k == "name" and m["role"] == "tool")}
                         for m in text_only(messages)],
            "stream_options": {"include_usage": True},
            "temperature": s.temperature, "top_p": s.top_p, "seed": s.seed,
        }
        if s.tools:
            req["tools"] = tool_calls.openai_tools(s.tools)
            # A named function where there is one: llama.cpp's server forces a call only by name.
            req["tool_choice"] = ("auto" if s.tool_choice != "required" else
                                  {"type": "function", "function": {"name": s.tools[0]["name"]}} if len(s.tools) == 1
                                  else "required")
        if s.max_tokens > 0:
            req["max_tokens"] = s.max_tokens
        if s.stop:
            req["stop"] = list(s.stop)
        # Not in OpenAI's own API: sent only when set, as llama.cpp, vLLM and Ollama accept them.
        extra = {k: v for k, v, default in (("top_k", s.top_k, 0), ("min_p", s.min_p, 0.0),
                                           ("repeat_penalty", s.repeat_penalty, 1.0)) if v != default}
        if extra:
            req["extra_body"] = extra
        return req

    def stream(self, messages: list[Message], sampling: Sampling | None = None, cache_key: str | None = None,
               should_stop: ShouldStop | None = None) -> Iterator[Event]:
        s = sampling or Sampling()
        check_messages(messages)

        def after(fig: Figures, state: dict) -> None:
            if state["n_valid"] == 0:
                raise ModelError(f"the OpenAI-compatible server at {self.base_url} answered something that is "
                                 f"not an OpenAI chat completion stream (no chunks): is base_url right?")
            usage = state["usage"]
            if usage is not None:
                fig.prompt_tokens = usage.prompt_tokens or 0
                fig.completion_tokens = usage.completion_tokens or 0
                details = getattr(usage, "prompt_tokens_details", None)
                fig.cached_prompt_tokens = (getattr(details, "cached_tokens", None) or 0) if details else 0
            else:  # the server gave no usage: count what we saw
                fig.completion_tokens = state["n_chunks"]
                fig.prompt_tokens = self.count_tokens(messages)
                fig.extra["usage_estimated"] = True
            timings = fig.extra.get("server_timings")
            if isinstance(timings, dict) and isinstance(timings.get("cache_n"), int):
                fig.cached_prompt_tokens = timings["cache_n"]

        for ev in self._stream(lambda: self.client.chat.completions.create(**self._request(messages, s)),
                               _pieces, should_stop, finish=None, after=after):
            # A server that leaves a model's <tool_call> text as content (no parser for its format): read it here.
            yield tool_calls.with_calls(ev, s.tools) if s.tools and ev["type"] == "done" and "tool_calls" not in ev else ev


def _pieces(chunks, fig: Figures, state: dict) -> Iterator[str | None]:
    """The text of each chunk of a chat completion stream; usage, timings and the finish go to fig and state."""
    state.update(n_chunks=0, n_valid=0, usage=None, tool_calls=[])
    for chunk in chunks:
        choices = getattr(chunk, "choices", None)
        if not isinstance(choices, list):
            raise ValueError(f"a chunk without choices: {str(chunk)[:120]}")
        state["n_valid"] += 1
        if getattr(chunk, "usage", None) is not None:
            state["usage"] = chunk.usage
        timings = (getattr(chunk, "model_extra", None) or {}).get("timings")
        if isinstance(timings, dict):
            fig.extra["server_timings"] = timings
        text = ""
        for choice in choices:
            delta = getattr(choice, "delta", None)
            piece = getattr(delta, "content", None) if delta is not None else None
            for tc in (getattr(delta, "tool_calls", None) or []) if delta is not None else []:
                _add_call_delta(state, tc)
            if piece:
                state["n_chunks"] += 1
                text += piece
            if getattr(choice, "finish_reason", None):
                state["finish"] = _FINISH.get(choice.finish_reason, "stop")
        yield text or None


def _add_call_delta(state: dict, tc) -> None:
    """One streamed piece of a tool call: the first of an index brings its id and name, the rest its arguments."""
    calls = state["tool_calls"]
    index = getattr(tc, "index", None)
    index = len(calls) if index is None else index
    while len(calls) <= index:
        calls.append({"id": "", "name": "", "arguments": ""})
    fn = getattr(tc, "function", None)
    calls[index]["id"] = getattr(tc, "id", None) or calls[index]["id"]
    if fn is not None:
        calls[index]["name"] = getattr(fn, "name", None) or calls[index]["name"]
        calls[index]["arguments"] += getattr(fn, "arguments", None) or ""
