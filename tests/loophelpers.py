"""The real loop driven to scripted replies: each candidate's sampling gains a llama.cpp grammar (GBNF literal)
that allows exactly its reply, so the real engine writes it. Replies are keyed (round, candidate); "inputs", when
given, is the reply to the request for test inputs (else the model writes its own)."""
from __future__ import annotations

import json
from dataclasses import replace

from execfeedback.loop.loop import Loop


def block(code: str) -> str:
    return f"```python\n{code}\n```"


class ScriptedLoop(Loop):
    """The real loop; only each candidate's sampling gains a grammar that allows exactly its scripted reply."""

    script: dict = {}

    def sampling_for(self, rnd, k, warm=False):
        s = super().sampling_for(rnd, k, warm)
        return replace(s, grammar="root ::= " + json.dumps(self.script[(rnd, k)]))

    def inputs_sampling(self):
        s = super().inputs_sampling()
        if "inputs" not in self.script:
            return s
        return replace(s, grammar="root ::= " + json.dumps(self.script["inputs"]))


def scripted(script: dict) -> type[ScriptedLoop]:
    """A ScriptedLoop class with this script (bare code made a code block)."""
    replies = {k: v if k == "inputs" or v.startswith("```") else block(v) for k, v in script.items()}
    return type("Scripted", (ScriptedLoop,), {"script": replies})
