"""The dataset card (README.md) written next to the exported files, from the export's report."""

from __future__ import annotations

from datetime import datetime, timezone
from .report import ExportReport
from .schema import FORMATS, SCHEMAS, SPLITS, STEP_COLUMNS, type_label

PLACEHOLDERS = {
    "api_key": "<SECRET_API_KEY>", "github_token": "<SECRET_GITHUB_TOKEN>", "aws_key": "<SECRET_AWS_KEY>",
    "private_key": "<SECRET_PRIVATE_KEY>", "token": "<SECRET_TOKEN>", "password": "<SECRET>, <SECRET_PASSWORD>",
    "email": "<EMAIL>", "app_token": "<SECRET_APP_TOKEN>", "env_secret": "<SECRET_ENV_VALUE>", "home_path": "~/",
    "kernel_token": "<SECRET_KERNEL_TOKEN>", "session": "<SECRET_SESSION>",
}
SECRET_LABELS = {
    "api_key": "API keys (sk-..., sk-ant-..., hf_..., AIza...)", "github_token": "GitHub tokens (ghp_..., github_pat_...)",
    "aws_key": "AWS keys (AKIA..., secret access keys)", "private_key": "private key blocks",
    "token": "bearer / auth tokens, JWTs, Slack tokens", "password": "passwords (assignments, URL credentials)",
    "email": "e-mail addresses", "app_token": "the Loopbook access token", "env_secret":
    "values of secret-looking environment variables", "home_path": "home directory paths (to ~/)",
    "kernel_token": "Loopbook kernel tokens (lbk...)", "session": "Loopbook login session ids (lbs_...)",
}
HOW_BUILT = {
    "sft": "One row per solved trace: the round-0 context, then every answer and the observation fed back after it, "
           "ending with the answer that passed. Human corrections add one single-turn row each (see corrections).",
    "sft_final": "One row per solved trace: the round-0 context and only the answer that passed, as if it came at "
                 "once. Human corrections add one row each.",
    "preference": "For every solved trace, one pair per failing attempt (every round, every failed candidate): "
                  "prompt = the round-0 context, identical for both sides; chosen = the answer that passed; "
                  "rejected = the failing answer. Interrupted attempts are left out.",
    "kto": "One row per attempt (interrupted ones left out) with the exact context it answered (round-0 context "
           "plus earlier turns); label = its code passed the visible checks (and the hidden tests, when run).",
    "trajectory": "One row per trace: the conversation, every attempt with its execution, the model manifest and "
                  "sampling settings.",
    "corrections": "One row per code cell a human edited after the model wrote it: what the model wrote (the "
                   "first version) and what the human made of it (the last one). Whitespace-only edits are left out.",
    "tools": "One row per prompt whose `&`fn` kernel functions the model called, when the loop ended in an answer "
             "(loops cut short by tool_steps or stopped give none): the conversation in OpenAI's tool-call format, "
             "as the model saw it (the values of `$`name` read into the prompt's turn), each call and its trimmed "
             "result (errors, timeouts and refusals included: they are what the model was told), and the final "
             "answer; the offered tools in `tools`. TRL's SFTTrainer and `datasets` take messages with tool_calls "
             "as they are; pass json.loads(row['tools']) as a chat template's tools. The trace filters (outcome, "
             "rounds, author, eval run) do not apply; --dialog, --since and --until do.",
    "completions": "The editor's ghost text (the model's completion at the cursor, logged with its outcome). "
                   "kind fim: one row per accepted suggestion, prefix + suffix -> chosen (the middle); suggestions "
                   "edited right after Tab took them, or dropped, give none. kind preference: a dropped suggestion "
                   "(rejected) against what was written at the same place instead (chosen: the text typed since, "
                   "then the next suggestion accepted in the same cell with the same suffix). The trace filters "
                   "(outcome, rounds, author, eval run) do not apply to these rows; --dialog, --since and --until do.",
}


def _table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    out += ["| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in r) + " |" for r in rows]
    return "\n".join(out)


def _pct(n: int, total: int) -> str:
    return f"{100 * n / total:.1f}%" if total else "-"


def _front_matter(r: ExportReport, ext: str) -> str:
    lines = ["---", "configs:"]
    for fmt in FORMATS:
        splits = [s for s in SPLITS if (fmt, s) in r.rows]
        if not splits:
            continue
        lines += [f"- config_name: {fmt}", "  data_files:"]
        for s in splits:
            lines += [f"  - split: {s}", f"    path: {fmt}.{s}.{ext}"]
    lines += ["tags:", "- code", "- execution-feedback", "- loopbook", "---", ""]
    return "\n".join(lines)


def render_card(r: ExportReport) -> str:
    o, s, counts = r.options, r.stats, r.rows
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    ext = "parquet" if o.parquet else "jsonl"
    loader = "parquet" if o.parquet else "json"
    first = next((f for f in FORMATS if (f, "train") in counts or (f, "test") in counts), "sft")
    parts = [_front_matter(r, ext), "# Loopbook execution-feedback dataset", "",
             f"Exported on {now} from a Loopbook store (schema version {r.schema_version}) with "
             "`python -m execfeedback export`. Each trace is one solve: a model answered a request in a notebook "
             "(or an eval task), its code ran in a Jupyter kernel, and what went wrong was sent back to it as the "
             "next turn until the code passed or the budget ran out.", ""]

    parts += ["## Files and counts", ""]
    rows = []
    for fmt in FORMATS:
        if fmt not in o.formats:
            continue
        tr, te = counts.get((fmt, "train"), 0), counts.get((fmt, "test"), 0)
        note = f"{s.correction_rows[fmt]} row(s) from human corrections" if s.correction_rows.get(fmt) else ""
        rows.append([fmt, f"`{fmt}.train.{ext}`: {tr}" if tr else "train: 0 (no file)",
                     f"`{fmt}.test.{ext}`: {te}" if te else "test: 0 (no file)", tr + te, note])
    parts += [_table(["format", "train", "test", "total", "note"], rows), ""]
    parts += ["Load a format with `datasets`:", "", "```python", "from datasets import load_dataset",
              f'ds = load_dataset("{loader}", data_files={{"train": "{first}.train.{ext}", '
              f'"test": "{first}.test.{ext}"}})', "```", ""]

    parts += ["## How rows are built", ""]
    parts += [f"- **{fmt}**: {HOW_BUILT[fmt]}" for fmt in FORMATS if fmt in o.formats]
    role = o.observation_role
    parts += ["", "## Observation role", "",
              f"Execution observations (the feedback turn: error, traceback, failing check, output) are in "
              f"`{role}` messages" + (" (the default, as Code-Feedback and CodeAct do)." if role == "user" else
                                      " (`--observation-role tool`). Check that your chat template renders a `tool` "
                                      "turn that follows an assistant turn without a tool call."),
              f"Observations longer than {o.max_observation_chars} characters are cut in the middle (head and tail "
              f"kept): {s.observations_cut} observations in {s.traces_with_cut} traces." if o.max_observation_chars
              else "Observations are not cut (--max-observation-chars 0).", ""]

    parts += ["## Outcome mix", ""]
    total = s.exported_traces
    mix = []
    for rounds in sorted(k for k in s.outcomes if k != "unsolved"):
        label = "solved at the first answer" if rounds == 1 else f"solved after {rounds - 1} feedback turn(s)"
        mix.append([label, rounds, s.outcomes[rounds], _pct(s.outcomes[rounds], total)])
    if s.outcomes.get("unsolved"):
        mix.append(["unsolved", "-", s.outcomes["unsolved"], _pct(s.outcomes["unsolved"], total)])
    parts += [f"{total} traces with {s.attempts} attempts were read for these files.", "",
              _table(["outcome", "rounds", "traces", "share"], mix) if mix else "(no traces: corrections only)", ""]
    if s.stop_reasons:
        parts += ["Unsolved traces stopped because: " + ", ".join(f"{k} {v}" for k, v in s.stop_reasons.most_common())
                  + ".", ""]
    if s.kto_labels:
        parts += [f"KTO labels: {s.kto_labels.get(True, 0)} desirable (true), {s.kto_labels.get(False, 0)} "
                  "undesirable (false).", ""]

    parts += ["## Models and manifests", ""]
    models = [[m or "-", b or "-", f or "-", q or "-", h or "-", n] for (m, b, f, q, h), n in s.models.most_common()]
    parts += [_table(["model", "backend", "file", "quant", "sha256 (first 12)", "traces"], models) if models
              else "(none)", "", "The full manifest of each trace (chat template hash, llama.cpp version, n_ctx, GPU "
              "layers, flash attention, ...) is in the `manifest` column of the trajectory files; local file paths "
              "are cut to the file name.", ""]

    parts += ["## Filters", ""]
    parts += [f"- {d}" for d in o.filters.described()]
    if s.author_skipped:
        parts += [f"- {s.author_skipped} traces left out by --author"]
    if s.no_attempts:
        parts += [f"- {s.no_attempts} traces without attempts (or without a stored input) left out"]
    if s.unfinished and not o.filters.include_unfinished:
        parts += [f"- {s.unfinished} unfinished traces in the store (a loop still running or cut off) left out"]
    parts += [""]

    parts += ["## Hygiene", "", "### Duplicates", "",
              f"Mode: `{o.dedup}`. Exact duplicates are identical rows. Near duplicates have the same prompt "
              "(whitespace and case ignored) and the same code once comments, docstrings, blank lines, spacing, "
              "indentation width and the code's own names are ignored (attribute names, builtins, keywords, "
              "numbers and strings count). The first row of each is kept.", ""]
    dd = [[f, *r.dedup[f]] for f in FORMATS if f in o.formats]
    parts += [_table(["format", "exact duplicates dropped", "near duplicates dropped"], dd), ""]
    parts += ["### Secrets", "",
              "Secrets in prompts, code, outputs and observations are replaced by placeholders (counted per trace "
              "in which they occur)."]
    lit = r.literal_secrets
    parts += [f"Scrubbed as literal values too: the Loopbook access token ({'found' if lit.get('app_token') else 'none found'}) "
              f"and {lit.get('env_secret', 0)} environment variable value(s) whose names contain KEY, TOKEN, SECRET, "
              "PASSWORD or CREDENTIAL.", ""]
    sec = [[SECRET_LABELS.get(k, k), ", ".join(f"`{p}`" for p in PLACEHOLDERS.get(k, "").split(", ") if p), n]
           for k, n in sorted(r.secrets.items())]
    parts += [_table(["kind", "placeholder", "replaced"], sec) if sec else "No secrets were found.", ""]
    parts += ["### Length", ""]
    if r.tokenizer is not None:
        tok = [[f, s.tokens_max.get(f, 0), s.tokens_cut.get(f, 0), s.tokens_dropped.get(f, 0)]
               for f in FORMATS if f in o.formats]
        parts += [f"Tokens counted with the vocabulary of `{r.tokenizer[0]}` "
                  + ("(its chat template applied)" if r.tokenizer[1] else "(content + 5 per message)")
                  + (f"; budget {o.max_tokens_per_row} tokens per row: rows over it had their observations cut "
                     "shorter, and rows that still did not fit were dropped." if o.max_tokens_per_row else "; no budget."),
                  "", _table(["format", "longest row (tokens, before cuts)", "rows cut", "rows dropped"], tok), ""]
    else:
        parts += ["No token budget (no --tokenizer-gguf / --max-tokens-per-row).", ""]

    parts += ["## Split", ""]
    what = ("task (the eval task id, else the request text with whitespace and case ignored)" if o.split_by == "task"
            else "dialog (dialogs that share a task are kept together)")
    parts += [f"Held out by {what}: test fraction {o.test_fraction}, seed {o.seed}. A group goes to test when "
              "a hash of the seed and its name falls below the fraction, so the split is the same on every export "
              "with the same seed, and one task's rows are never in both train and test.",
              f"Groups: {r.groups['train']} in train, {r.groups['test']} in test."]
    if o.exclude_eval_runs:
        parts += [f"Eval runs kept out of train: {', '.join(o.exclude_eval_runs)}. Every task they contain "
                  f"({r.forced_tasks}) is in test only, whatever trace it comes from."]
    parts += [""]

    parts += ["## Error types", "", "Execution status of every attempt in the traces read (the first error of an "
              "answer is usually what the feedback turn is about).", ""]
    errs = [[st, en or "-", n, _pct(n, s.attempts)] for (st, en), n in s.errors.most_common(40)]
    parts += [_table(["exec_status", "error", "attempts", "share"], errs) if errs else "(none)", ""]

    parts += ["## Schema", "", "Every column has one type in every row and is never null: \"\" or -1 stand for "
              "\"not recorded\". A message is `{\"role\": ..., \"content\": ...}` with string content; roles are "
              f"system, user, assistant{', tool' if role == 'tool' else ''}.", ""]
    for fmt in FORMATS:
        if fmt not in o.formats:
            continue
        parts += [f"### {fmt} (`{fmt}.<split>.{ext}`)", "",
                  _table(["column", "type", "meaning"], [[c.name, type_label(c), c.doc] for c in SCHEMAS[fmt]]), ""]
        if fmt == "trajectory":
            parts += ["Each step:", "", _table(["field", "type", "meaning"],
                                               [[c.name, type_label(c), c.doc] for c in STEP_COLUMNS]), ""]
    if s.rebuilt:
        parts += [f"Note: {s.rebuilt} traces had a last input that was not their first model input plus (answer, "
                  "feedback) turns; only their first input was used, and rows that need a later input were left out.",
                  ""]
    if s.edits_no_trace or s.edits_filtered or s.edits_trivial:
        parts += [f"Human edits left out: {s.edits_trivial} whitespace-only, {s.edits_no_trace} with no trace to "
                  f"give them a prompt, {s.edits_filtered} whose trace the filters left out.", ""]
    return "\n".join(parts).rstrip() + "\n"
