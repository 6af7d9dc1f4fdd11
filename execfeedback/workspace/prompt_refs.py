"""`$`name`` and `&`fn`` in a prompt: the kernel's values put into the prompt's own turn, its functions offered as
tools. Resolved only for the prompt being answered, when it is sent: earlier prompts keep their text as written, so
the turns before this one render the same every time and the model's cached prefix still matches."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from kernels import KernelPool
from kernels.namespace import ToolSpec, VariableNote, tool_specs, variables

VARIABLE = re.compile(r"\$`([^`\n]{1,200})`")
TOOL = re.compile(r"&`([^`\n]{1,200})`")
VALUE_CHARS = 2_000     # per value, head and tail kept (kernels.namespace trims it)
VALUE_TIMEOUT_S = 2.0   # per value: a repr that hangs longer is stopped and says so


@dataclass
class Refs:
    """What a prompt refers to: variable and tool names, each once, in order."""

    variables: list[str] = field(default_factory=list)
    tools: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.variables or self.tools)


@dataclass
class Resolved:
    """A prompt with its references resolved: the text the model gets, the tools offered, notes for the page."""

    text: str
    tools: list[dict]                  # specs of the functions offered
    values: list[VariableNote]
    specs: list[ToolSpec]

    @property
    def notes(self) -> list[str]:
        """What went wrong, one line each (an unknown name, a repr that raised or hung, a tool not offered)."""
        bad = [f"$`{v.name}`: {v.text}" for v in self.values if v.status != "ok"]
        return bad + [f"&`{s.name}` is not offered as a tool: {s.text}" for s in self.specs if s.status != "ok"]

    def to_dict(self) -> dict:
        return {"values": [v.to_dict() for v in self.values], "tools": [s.to_dict() for s in self.specs],
                "notes": self.notes}


def _unique(found: list[str]) -> list[str]:
    return list(dict.fromkeys(n.strip() for n in found))


def find_refs(source: str) -> Refs:
    return Refs(_unique(VARIABLE.findall(source)), _unique(TOOL.findall(source)))


def value_block(note: VariableNote) -> str:
    """One value as the model reads it: its summary, or why there is none."""
    if note.status == "ok":
        kind = f" ({note.type})" if note.type else ""
        body = note.text.rstrip()
        return f"`{note.name}`{kind}:\n```\n{body}\n```" if "\n" in body else f"`{note.name}`{kind} = {body}"
    return f"`{note.name}`: not available ({note.text})"


def prompt_text(source: str, values: list[VariableNote], specs: list[ToolSpec]) -> str:
    """The prompt as sent: the references written as plain `name`, then the values as read from the kernel and a
    line for each function that could not be offered."""
    text = TOOL.sub(lambda m: f"`{m.group(1).strip()}`", VARIABLE.sub(lambda m: f"`{m.group(1).strip()}`", source))
    parts = [text.strip()]
    if values:
        parts.append("Values in the kernel when this was asked:\n" + "\n".join(value_block(v) for v in values))
    missing = [s for s in specs if s.status != "ok"]
    if missing:
        parts.append("\n".join(f"`{s.name}` cannot be called as a tool: {s.text}" for s in missing))
    return "\n\n".join(parts)


async def resolve(pool: KernelPool, key: str, source: str, refs: Refs | None = None) -> Resolved:
    """Read the values and tool specs a prompt names from the key's kernel (started if it is not running)."""
    refs = refs if refs is not None else find_refs(source)
    values = await variables(pool, key, refs.variables, timeout_per_name=VALUE_TIMEOUT_S,
                             max_chars=VALUE_CHARS) if refs.variables else []
    specs = await tool_specs(pool, key, refs.tools) if refs.tools else []
    offered = [s.spec for s in specs if s.status == "ok" and s.spec]
    return Resolved(prompt_text(source, values, specs), offered, values, specs)
