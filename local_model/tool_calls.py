"""The tool-call protocol every backend speaks: tools offered as JSON-schema specs, calls out in the done event,
results back as OpenAI-shaped messages.

A tool spec is {"name", "description", "parameters": JSON schema}. A call is {"id", "name", "arguments": JSON
text}; the done event of a reply that calls tools carries them as "tool_calls". In the conversation an assistant
turn that called tools is {"role": "assistant", "content": text, "tool_calls": [{"id", "type": "function",
"function": {"name", "arguments"}}]} and each result is {"role": "tool", "tool_call_id", "name", "content"}:
OpenAI's own format, which the OpenAI backend sends as is and the others translate.

Models without a tool format of their own (the in-process model's text protocol) write a call as
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, the form Qwen2.5's chat template teaches.
"""
from __future__ import annotations

import json
import re
import uuid
from typing import Any

TOOL_CHOICES = ("auto", "required")
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|\Z)", re.S)
_FENCED = re.compile(r"```(?:json)?\s*(\{.*\})\s*```", re.S)


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:12]


def call(name: str, arguments: str | dict, call_id: str | None = None) -> dict[str, Any]:
    """One tool call, its arguments as JSON text."""
    args = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return {"id": call_id or new_call_id(), "name": name, "arguments": args}


def openai_tools(specs: list[dict]) -> list[dict]:
    return [{"type": "function", "function": {"name": s["name"], "description": s.get("description") or "",
                                              "parameters": s.get("parameters") or {"type": "object"}}}
            for s in specs]


def assistant_turn(text: str, calls: list[dict]) -> dict[str, Any]:
    """The assistant message of a reply that called `calls` (OpenAI format)."""
    return {"role": "assistant", "content": text,
            "tool_calls": [{"id": c["id"], "type": "function",
                            "function": {"name": c["name"], "arguments": c["arguments"]}} for c in calls]}


def tool_turn(call_id: str, name: str, text: str) -> dict[str, Any]:
    return {"role": "tool", "tool_call_id": call_id, "name": name, "content": text}


def calls_of(message: dict) -> list[dict]:
    """The calls of an assistant message, as {"id", "name", "arguments"}."""
    return [{"id": c.get("id") or "", "name": (c.get("function") or {}).get("name") or "",
             "arguments": (c.get("function") or {}).get("arguments") or "{}"} for c in message.get("tool_calls") or []]


def arguments_object(arguments: str) -> Any:
    """The arguments as a JSON value for templates that render them (the text itself when it is not JSON)."""
    try:
        return json.loads(arguments)
    except (TypeError, ValueError):
        return arguments


# --- the text protocol ------------------------------------------------------------------------------


def describe(specs: list[dict]) -> str:
    """The offered tools and how to call them, for a model whose chat template has no tools. The same text whatever
    the tool choice, so every step of a tool loop extends the prompt before it (and its KV cache)."""
    lines = ["You may call these Python functions of the notebook's kernel. To call one, answer with only",
             f'{CALL_OPEN}{{"name": <function name>, "arguments": <JSON object>}}{CALL_CLOSE}',
             "and the result comes back in a <tool_response> message. When you have what you need, answer in "
             "plain text.",
             "Functions:"]
    lines += [json.dumps({"name": s["name"], "description": s.get("description") or "",
                          "parameters": s.get("parameters") or {}}, ensure_ascii=False) for s in specs]
    return "\n".join(lines)


def call_text(c: dict) -> str:
    return f'{CALL_OPEN}\n{{"name": {json.dumps(c["name"])}, "arguments": {c["arguments"] or "{}"}}}\n{CALL_CLOSE}'


def response_text(content: str) -> str:
    return f"<tool_response>\n{content}\n</tool_response>"


def as_text_messages(messages: list[dict]) -> list[dict]:
    """Tool turns written as text: a call as its <tool_call> text, a result as a user <tool_response>."""
    out: list[dict] = []
    for m in messages:
        if m["role"] == "tool":
            text = response_text(m.get("content") or "")
            if out and out[-1]["role"] == "user" and isinstance(out[-1]["content"], str) \
                    and out[-1]["content"].startswith("<tool_response>"):
                out[-1] = {"role": "user", "content": out[-1]["content"] + "\n" + text}
            else:
                out.append({"role": "user", "content": text})
        elif m.get("tool_calls"):
            said = (m.get("content") or "").strip()
            out.append({"role": "assistant",
                        "content": "\n".join([said] * bool(said) + [call_text(c) for c in calls_of(m)])})
        else:
            out.append(m)
    return out


def _call_from(body: str, names: set[str] | None = None) -> dict | None:
    """A call from one JSON text {"name", "arguments"}; with `names`, only for a name among them (else None)."""
    try:
        obj = json.loads(body)
    except ValueError:
        return None if names is not None else call("", body)
    if not isinstance(obj, dict) or (names is not None and obj.get("name") not in names):
        return None if names is not None else call("", body)
    args = obj.get("arguments", obj.get("parameters", {}))
    return call(str(obj.get("name") or ""), args if isinstance(args, str) else json.dumps(args))


def parse_calls(text: str, names: list[str] | None = None) -> tuple[str, list[dict]]:
    """(the text outside the calls, the calls) of a reply in the text protocol. A call that is not JSON keeps its
    text as the arguments and the name "", so the error goes back to the model as the call's result.

    Small models often skip the tags and answer with the bare JSON object, or with it in a ```json block: with the
    offered `names`, a reply that is only such an object naming one of them is read as that call too."""
    calls = [_call_from(m.group(1).strip()) for m in _CALL.finditer(text)]
    if calls:
        return _CALL.sub("", text).strip(), calls
    bare = _FENCED.fullmatch(text.strip())
    body = bare.group(1) if bare else text.strip()
    found = _call_from(body, set(names)) if names and body.startswith("{") else None
    return ("", [found]) if found else (text, [])


def with_calls(done: dict, specs: list[dict] | None = None) -> dict:
    """A done event of a text-protocol reply, its calls parsed out of the text into "tool_calls"."""
    said, calls = parse_calls(done.get("text") or "", [s["name"] for s in specs or []])
    if calls:
        done["text"], done["tool_calls"] = said, calls
    return done


def call_grammar(specs: list[dict]) -> str:
    """GBNF for exactly one <tool_call> to one of `specs`, its arguments valid for that tool's schema (llama.cpp's
    JSON-schema converter); a schema it cannot convert falls back to any JSON object."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    alternatives = []
    for s in specs:
        params = s.get("parameters") or {"type": "object"}
        alternatives.append({"type": "object", "properties": {"name": {"const": s["name"]}, "arguments": params},
                             "required": ["name", "arguments"], "additionalProperties": False})
    schema = alternatives[0] if len(alternatives) == 1 else {"oneOf": alternatives}
    try:
        body = json_schema_to_gbnf(json.dumps(schema), ["name", "arguments"])
    except Exception:  # noqa: BLE001 - a schema feature the converter lacks: any call object
        body = json_schema_to_gbnf(json.dumps({"type": "object", "properties": {
            "name": {"enum": [s["name"] for s in specs]}, "arguments": {"type": "object"}},
            "required": ["name", "arguments"]}), ["name", "arguments"])
    lines = body.splitlines()
    renamed = [("call-json ::=" + ln[len("root ::="):]) if ln.startswith("root ::=") else ln for ln in lines]
    return "\n".join([f'root ::= "{CALL_OPEN}\\n" call-json "\\n{CALL_CLOSE}"', *renamed]) + "\n"
