"""The real loop driven to scripted replies: each candidate's sampling gains a llama.cpp grammar (GBNF literal)
that allows exactly its reply, so the real engine writes it. Replies are keyed (round, candidate)."""
from __future__ import annotations

import json
from dataclasses import replace

from execfeedback.loop.loop import Loop


def block(code: str) -> str:
    return f"```python\n{code}\n```"


class ScriptedLoop(Loop):
    script: dict[tuple[int, int], str] = {}

    def sampling_for(self, rnd, k, warm=False):
        s = super().sampling_for(rnd, k, warm)
        return replace(s, grammar="root ::= " + json.dumps(self.script[(rnd, k)]))


def scripted(script: dict[tuple[int, int], str]) -> type[ScriptedLoop]:
    """A ScriptedLoop class with this script (code blocks made of bare code)."""
    replies = {k: v if v.startswith("```") else block(v) for k, v in script.items()}
    return type("Scripted", (ScriptedLoop,), {"script": replies})
