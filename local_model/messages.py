"""Checking chat messages and flattening their content parts for text-only backends."""
from __future__ import annotations

from typing import Any

from .protocol import Message, ModelError

TOOL_KEYS = ("tool_calls", "tool_call_id", "name")
ROLES = ("system", "user", "assistant", "tool")  # "tool": a tool's result (see tool_calls.py)


def image_placeholder(part: dict[str, Any]) -> str:
    return f"[image: {part.get('mime') or 'image'}]"


def check_messages(messages: list[Message]) -> None:
    """Raise ModelError naming the first malformed message."""
    if not isinstance(messages, list) or not messages:
        raise ModelError("messages must be a non-empty list of {'role', 'content'} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ModelError(f"message {i} needs a role among {ROLES}: got {m!r:.120}")
        content = m.get("content")
        if m["role"] == "tool" and not isinstance(m.get("tool_call_id"), str):
            raise ModelError(f"message {i}: a tool result needs the tool_call_id of the call it answers")
        if m.get("tool_calls") is not None and (m["role"] != "assistant" or not isinstance(m["tool_calls"], list)):
            raise ModelError(f"message {i}: only an assistant message has tool_calls, a list of calls")
        if isinstance(content, str) or (content is None and m.get("tool_calls")):
            continue
        if not isinstance(content, list):
            raise ModelError(f"message {i}: content must be a string or a list of parts")
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                continue
            if kind == "image" and isinstance(part.get("data"), str):
                continue
            raise ModelError(
                f"message {i}: each part must be {{'type': 'text', 'text': ...}} or "
                f"{{'type': 'image', 'mime': ..., 'data': <base64>}}; got {part!r:.120}"
            )


def content_text(content: str | list[dict[str, Any]]) -> str:
    """The content as plain text; an image part becomes a short placeholder."""
    if isinstance(content, str):
        return content
    return "\n".join(
        p["text"] if p.get("type") == "text" else image_placeholder(p) for p in content
    )


def text_only(messages: list[Message]) -> list[dict[str, Any]]:
    """Copies of the messages with string content (the caller's list is left untouched); tool calls and results
    keep their ids."""
    return [{**{k: m[k] for k in TOOL_KEYS if k in m}, "role": m["role"], "content": content_text(m["content"] or "")}
            for m in messages]


def messages_text(messages_or_text: list[Message] | str) -> str:
    if isinstance(messages_or_text, str):
        return messages_or_text
    return "\n".join(f"{m['role']}: {content_text(m['content'] or '')}" for m in messages_or_text)
