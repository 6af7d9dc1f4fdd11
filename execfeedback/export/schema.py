"""The columns of every export file: one definition for the writers (Parquet types) and the card.

Every column has one type in every row and is never null ("" or -1 stand for "not recorded"), so
`datasets` and pyarrow infer the same schema from any chunk of a file.
"""

from __future__ import annotations

from dataclasses import dataclass

FORMATS = ("sft", "sft_final", "preference", "kto", "trajectory", "corrections", "completions", "tools")
SPLITS = ("train", "test")


@dataclass(frozen=True)
class Column:
    name: str
    type: str  # string | int | float | bool | json (a JSON text) | messages | steps | tool_messages
    doc: str


STEP_COLUMNS = (
    Column("attempt_id", "int", "attempt id in the store"),
    Column("round", "int", "0 for the first answer, r for the answer after r feedback turns"),
    Column("candidate", "int", "index among the candidates sampled for the same round"),
    Column("in_chain", "bool", "this answer is the one the conversation went on from"),
    Column("author", "string", "model, human or human_edit"),
    Column("completion", "string", "the model's raw reply"),
    Column("code", "string", "the code extracted from it (\"\" when none)"),
    Column("exec_status", "string", "ok, error, timeout, died, interrupted, no_code, syntax_error or check_failed"),
    Column("passed", "bool", "the code ran and every visible check passed"),
    Column("hidden", "string", "hidden tests: passed, failed, or \"\" when not run"),
    Column("ename", "string", "exception name (\"\" when none)"),
    Column("evalue", "string", "exception message"),
    Column("traceback", "string", "ANSI-free traceback, lines joined"),
    Column("stdout", "string", "captured standard output (capped)"),
    Column("stderr", "string", "captured standard error (capped)"),
    Column("checks", "json", "check results as JSON text (\"null\" when there were none)"),
    Column("observation", "string", "the feedback turn sent back after this attempt (\"\" when none)"),
    Column("prompt_tokens", "int", "prompt tokens (-1: not recorded)"),
    Column("cached_prompt_tokens", "int", "prompt tokens served from the cache (-1: not recorded)"),
    Column("completion_tokens", "int", "completion tokens (-1: not recorded)"),
    Column("ttft_s", "float", "time to first token in seconds (-1: not recorded)"),
    Column("decode_s", "float", "decode time in seconds (-1: not recorded)"),
    Column("exec_s", "float", "execution wall time in seconds (-1: not recorded)"),
    Column("sampling", "json", "sampling settings of this attempt as JSON text"),
)

SCHEMAS: dict[str, tuple[Column, ...]] = {
    "sft": (
        Column("messages", "messages", "system (when there was one), user, then assistant and observation turns "
               "alternating; the last turn is the assistant's answer that passed"),
    ),
    "sft_final": (
        Column("messages", "messages", "the round-0 context, then one assistant turn: the answer that passed"),
    ),
    "preference": (
        Column("prompt", "messages", "the round-0 context (system, user, ...), the same for chosen and rejected"),
        Column("chosen", "messages", "one assistant turn: the answer that finally passed"),
        Column("rejected", "messages", "one assistant turn: a failing answer of the same trace"),
    ),
    "kto": (
        Column("prompt", "messages", "the exact context of the attempt (round-0 context plus earlier turns)"),
        Column("completion", "messages", "one assistant turn: the attempt's answer"),
        Column("label", "bool", "true when the code passed (and the hidden tests, when they were run)"),
    ),
    "trajectory": (
        Column("trace_id", "int", "trace id in the store"),
        Column("kind", "string", "solve, fix or eval"),
        Column("task_id", "string", "eval task id (\"\" for notebook solves)"),
        Column("task_source", "string", "where the task came from"),
        Column("dialog_id", "int", "dialog id (0: none)"),
        Column("eval_run", "string", "eval run name (\"\" when not an eval)"),
        Column("model", "string", "model name"),
        Column("backend", "string", "llama, anthropic or openai"),
        Column("created_at", "string", "UTC start time, ISO 8601"),
        Column("outcome", "string", "solved or unsolved"),
        Column("stop_reason", "string", "why the loop stopped"),
        Column("rounds", "int", "rounds the loop ran (1: done at the first round), as --min-rounds counts"),
        Column("n_attempts", "int", "attempts, candidates included"),
        Column("manifest", "json", "model manifest as JSON text (file name, sha256, quant, template hash, n_ctx...)"),
        Column("sampling", "json", "sampling settings as JSON text"),
        Column("prompt", "messages", "the round-0 context"),
        Column("messages", "messages", "the whole conversation: context, answers and observations"),
        Column("steps", "steps", "every attempt in order (round, candidate), with its execution"),
    ),
    "corrections": (
        Column("edit_id", "int", "id of the last edit of the cell"),
        Column("n_edits", "int", "how many edits the cell had"),
        Column("trace_id", "int", "the trace whose code was edited"),
        Column("dialog_id", "int", "dialog id (0: none)"),
        Column("message_id", "int", "the edited cell"),
        Column("model", "string", "model that wrote the code"),
        Column("created_at", "string", "UTC time of the last edit, ISO 8601"),
        Column("prompt", "messages", "the round-0 context of the trace"),
        Column("model_code", "string", "what the model wrote"),
        Column("human_code", "string", "what the human made of it"),
        Column("diff", "string", "unified diff from model_code to human_code"),
    ),
    "completions": (
        Column("kind", "string", "fim (an accepted suggestion) or preference (a dropped one against what was "
                                 "written instead)"),
        Column("completion_id", "int", "the accepted completion's id in the store"),
        Column("rejected_id", "int", "the dropped completion's id (-1 in fim rows)"),
        Column("dialog_id", "int", "dialog id (0: none)"),
        Column("message_id", "int", "the cell typed in (0: deleted since)"),
        Column("cell_type", "string", "code or prompt"),
        Column("model", "string", "model that made the accepted suggestion"),
        Column("mode", "string", "fim (the model read the suffix) or prefix (it read only the prefix)"),
        Column("created_at", "string", "UTC time of the accepted suggestion, ISO 8601"),
        Column("prefix", "string", "the text before the cursor: the cells above, then the cell's text"),
        Column("suffix", "string", "the cell's text after the cursor"),
        Column("chosen", "string", "the middle the human kept (preference: typed text, then the accepted suggestion)"),
        Column("rejected", "string", "the dropped suggestion (\"\" in fim rows)"),
    ),
    "tools": (
        Column("request_id", "string", "the tool loop's id (its steps in the store's tool_steps table)"),
        Column("dialog_id", "int", "dialog id (0: none)"),
        Column("message_id", "int", "the prompt cell (0: deleted since)"),
        Column("model", "string", "model that answered"),
        Column("backend", "string", "llama, openai or anthropic"),
        Column("created_at", "string", "UTC time the loop started, ISO 8601"),
        Column("steps", "int", "model turns, the final answer included"),
        Column("calls", "int", "tool calls run"),
        Column("failed_calls", "int", "calls whose result was an error, a timeout, an unknown tool or bad arguments"),
        Column("tools", "json", "the functions offered, OpenAI tool format: [{\"type\": \"function\", \"function\": "
                                "{name, description, parameters}}] as JSON text"),
        Column("messages", "tool_messages", "system, user (with the kernel values the prompt named), then assistant "
               "turns with tool_calls and tool turns with their tool_call_id, ending with the assistant's answer"),
    ),
}


def arrow_schema(fmt: str):
    """The pyarrow schema of a format (pyarrow is imported only here, for --parquet)."""
    import pyarrow as pa

    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    scalar = {"string": pa.string(), "json": pa.string(), "int": pa.int64(), "float": pa.float64(),
              "bool": pa.bool_(), "messages": pa.list_(message)}
    step = pa.struct([(c.name, scalar[c.type]) for c in STEP_COLUMNS])
    scalar["steps"] = pa.list_(step)
    call = pa.struct([("id", pa.string()), ("type", pa.string()),
                      ("function", pa.struct([("name", pa.string()), ("arguments", pa.string())]))])
    scalar["tool_messages"] = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string()),
                                                  ("tool_calls", pa.list_(call)), ("tool_call_id", pa.string()),
                                                  ("name", pa.string())]))
    return pa.schema([(c.name, scalar[c.type]) for c in SCHEMAS[fmt]])


def type_label(column: Column) -> str:
    if column.type == "messages":
        return "list of messages"
    if column.type == "steps":
        return "list of steps"
    if column.type == "tool_messages":
        return "list of messages (role, content, tool_calls, tool_call_id, name)"
    return {"json": "string (JSON)"}.get(column.type, column.type)
