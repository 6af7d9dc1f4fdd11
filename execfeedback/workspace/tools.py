"""The tool-step loop of a prompt that offers kernel functions (`&`fn``): the model's calls run in the dialog's
kernel and their trimmed results go back to it, for at most `tool_steps` steps."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any, Awaitable, Callable

from kernels import KernelPool
from kernels.namespace import ToolResult, call_tool
from local_model import Sampling
from local_model.tool_calls import assistant_turn, tool_turn

TOOL_TIMEOUT_S = 30.0   # one call; a hanging tool is interrupted and the model is told
RESULT_CHARS = 4_000    # of one result, head and tail kept

# (messages, sampling) -> the step's done event (its "tool_calls" when the model called tools)
Step = Callable[[list[dict], Sampling], Awaitable[dict]]


@dataclass
class ToolRun:
    done: dict                                   # the last step's done event
    steps: list[dict] = field(default_factory=list)
    messages: list[dict] = field(default_factory=list)  # the conversation, OpenAI tool-call format
    note: str | None = None                      # why the loop stopped early

    @property
    def text(self) -> str:
        """What the model said over all steps (its calls shown apart)."""
        return "\n\n".join(s["text"].strip() for s in self.steps if s["text"].strip())


class KernelTools:
    """Calls the offered functions in one kernel; a name that was not offered is refused without running."""

    def __init__(self, pool: KernelPool, key: str, specs: list[dict], *, timeout: float | None = None,
                 max_chars: int | None = None):
        self.pool, self.key, self.specs = pool, key, specs
        self.timeout = TOOL_TIMEOUT_S if timeout is None else timeout
        self.max_chars = RESULT_CHARS if max_chars is None else max_chars

    @property
    def names(self) -> list[str]:
        return [s["name"] for s in self.specs]

    async def __call__(self, name: str, arguments: str) -> ToolResult:
        if name not in self.names:
            offered = ", ".join(self.names)
            what = f"there is no tool named `{name}`" if name else f"the call could not be read ({arguments[:200]})"
            return ToolResult(name, "missing", f"{what}; the tools are: {offered}. Call one of them by name with "
                                               "a JSON object of arguments.")
        return await call_tool(self.pool, self.key, name, arguments or "{}", timeout=self.timeout,
                               max_chars=self.max_chars)


def call_record(call: dict, res: ToolResult) -> dict[str, Any]:
    """One call and its result, as the page, reply_meta and the trace keep it."""
    return {"id": call["id"], "name": call["name"], "arguments": call["arguments"], "status": res.status,
            "result": res.text, "type": res.type, "stdout": res.stdout, "duration_s": res.duration_s}


def call_label(call: dict) -> str:
    """`name(a=1, b='x')` for the page; arguments that are not a JSON object are shown as they came."""
    try:
        args = json.loads(call.get("arguments") or "{}")
    except ValueError:
        args = None
    inner = (", ".join(f"{k}={v!r}" for k, v in args.items()) if isinstance(args, dict)
             else str(call.get("arguments") or ""))
    return f"{call.get('name') or '?'}({inner})"


async def run_tools(step: Step, messages: list[dict], sampling: Sampling, tools: KernelTools, max_steps: int, *,
                    on_call: Callable[[int, dict], None] | None = None,
                    on_step: Callable[[dict, list[dict]], None] | None = None,
                    stopped: Callable[[], bool] = lambda: False) -> ToolRun:
    """Ask, run the calls, give the results back, ask again: until a reply without calls, a Stop or an error, or
    `max_steps` steps of calls (a reply asking for more is not run and the run says so). The first step uses the
    sampling's tool_choice; later ones leave it to the model. A call that repeats an earlier one exactly is not run
    again: the model gets the earlier result back with a reminder to answer."""
    run = ToolRun({}, messages=list(messages))
    seen: dict[tuple, dict] = {}  # each distinct call's first record
    for n in range(max_steps + 1):
        s = replace(sampling, tools=tools.specs, tool_choice=sampling.tool_choice if n == 0 else "auto")
        inputs = list(run.messages)
        done = await step(inputs, s)
        run.done = done
        calls = done.get("tool_calls") or []
        record = {"step": n, "text": done.get("text") or "", "finish_reason": done.get("finish_reason"),
                  "figures": done.get("figures") or {}, "calls": []}
        run.steps.append(record)
        if not calls or done.get("finish_reason") in ("cancelled", "error"):
            _tell(on_step, record, inputs)
            return run
        if n == max_steps:
            run.note = (f"The model asked for more tool calls after {max_steps} steps (the dialog's tool_steps); "
                        "they were not run and the answer stops here.")
            record["calls"] = [{**c, "status": "not_run", "result": ""} for c in calls]
            _tell(on_step, record, inputs)
            return run
        run.messages.append(assistant_turn(done.get("text") or "", calls))
        for c in calls:
            same = seen.get(_call_key(c))
            if stopped():
                res = ToolResult(c["name"], "not_run", "stopped before this call ran")
            elif same is not None:  # small models call again instead of answering: remind, do not rerun
                res = ToolResult(c["name"], "repeated", f"You already called {call_label(c)}; it returned: "
                                                        f"{same['result']}\nUse that result to answer.")
            else:
                res = await tools(c["name"], c["arguments"])
            rec = call_record(c, res)
            seen.setdefault(_call_key(c), rec)
            record["calls"].append(rec)
            run.messages.append(tool_turn(c["id"], c["name"], res.text))
            if on_call is not None:
                on_call(n, rec)
        _tell(on_step, record, inputs)
        if stopped():
            run.done = {**done, "finish_reason": "cancelled"}
            return run
    return run


def _call_key(call: dict) -> tuple:
    try:
        args = json.dumps(json.loads(call["arguments"] or "{}"), sort_keys=True)
    except ValueError:
        args = call["arguments"]
    return call["name"], args


def _tell(on_step, record: dict, inputs: list[dict]) -> None:
    if on_step is not None:
        on_step(record, inputs)
