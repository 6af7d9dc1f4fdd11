"""Training rows for the adapter: read an export, weigh each assistant turn, tokenize with per-token weights.

How turns are weighed (the loss is computed on assistant turns only; prompts, earlier cells and the
execution feedback are context):

- the answer that passed after feedback (a fix turn) gets `fix_weight` (default 2.0): fixing code
  from an error is what a small model is worst at and what these traces uniquely teach;
- an answer that passed at once (round 0) gets 1.0;
- the failed answers earlier in a solved trajectory get `failed_weight` (default 0.0): the model
  sees them as context for the fix, but is not taught to write them.

The loss of a batch is the weighted sum of token losses divided by the sum of the weights, so the
weights are relative: a fix token counts twice a round-0 token.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROLES = ("system", "user", "assistant", "tool")
MIN_ROWS = 16


class FinetuneError(Exception):
    """Bad input for fine-tuning; the message says what to do next."""


class FinetuneInterrupted(FinetuneError):
    """The run stopped early (Ctrl-C, SIGTERM, out of memory) and left a checkpoint to resume from."""


def is_oom(e: BaseException) -> bool:
    """An allocation failure from torch on any device (CUDA raises OutOfMemoryError, the CPU a RuntimeError)."""
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and any(s in text for s in ("out of memory", "can't allocate memory",
                                                                    "not enough memory", "failed to allocate"))


@dataclass
class ExportData:
    """The rows of one export directory, and what identifies them."""

    directory: Path
    sft_train: list[dict]
    sft_test: list[dict]
    pref_train: list[dict]
    pref_test: list[dict]
    files: dict[str, int]
    hash: str
    card_head: str = ""
    filters: dict = field(default_factory=dict)

    def summary(self) -> dict:
        return {"dir": str(self.directory), "hash": self.hash, "files": self.files, "filters": self.filters}


def _read_jsonl(path: Path, kind: str) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise FinetuneError(f"{path.name} line {n} is not JSON ({e}). Export again with "
                                    "`python -m execfeedback export`.") from None
            problem = _check_row(row, kind)
            if problem:
                raise FinetuneError(f"{path.name} line {n}: {problem}. This file does not look like a Loopbook "
                                    "export; export again with `python -m execfeedback export`.")
            rows.append(row)
    return rows


def _check_messages(msgs: Any, what: str) -> str | None:
    if not isinstance(msgs, list) or not msgs:
        return f"'{what}' must be a non-empty list of messages"
    for m in msgs:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            return f"'{what}' holds a message that is not {{role, content}} with a known role"
    return None


def _check_row(row: Any, kind: str) -> str | None:
    if not isinstance(row, dict):
        return "a row must be a JSON object"
    if kind == "sft":
        problem = _check_messages(row.get("messages"), "messages")
        if problem:
            return problem
        if row["messages"][-1]["role"] != "assistant":
            return "an SFT row must end with the assistant's answer"
        return None
    for key in ("prompt", "chosen", "rejected"):
        problem = _check_messages(row.get(key), key)
        if problem:
            return problem
    return None


def read_export(directory: str | Path, *, need_preference: bool = False) -> ExportData:
    """Read sft.{train,test}.jsonl (and preference.*) from an export directory."""
    d = Path(directory).expanduser()
    if not d.is_dir():
        raise FinetuneError(f"--export {d}: no such directory. Export first: `python -m execfeedback export --format "
                            "sft,preference --out DIR`, or leave --export out to export from the store.")
    if (d / "sft.train.parquet").exists() and not (d / "sft.train.jsonl").exists():
        raise FinetuneError(f"{d} holds a Parquet export; fine-tuning reads JSON Lines. Export again without --parquet.")
    if not (d / "sft.train.jsonl").is_file():
        raise FinetuneError(f"{d} has no sft.train.jsonl: export with the sft format (`python -m execfeedback export "
                            "--format sft,preference --out DIR`).")
    if need_preference and not (d / "preference.train.jsonl").is_file():
        raise FinetuneError(f"--dpo needs preference pairs but {d} has no preference.train.jsonl. Export with "
                            "--format sft,preference, or leave --dpo out.")
    h = hashlib.sha256()
    files, loaded = {}, {}
    for fmt, kind in (("sft", "sft"), ("preference", "preference")):
        for split in ("train", "test"):
            name = f"{fmt}.{split}.jsonl"
            p = d / name
            if p.is_file():
                h.update(name.encode() + b"\0" + hashlib.sha256(p.read_bytes()).digest())
                loaded[(fmt, split)] = _read_jsonl(p, kind)
                files[name] = len(loaded[(fmt, split)])
    card = d / "README.md"
    head = card.read_text(encoding="utf-8")[:4000] if card.is_file() else ""
    return ExportData(d, loaded.get(("sft", "train"), []), loaded.get(("sft", "test"), []),
                      loaded.get(("preference", "train"), []), loaded.get(("preference", "test"), []),
                      files, h.hexdigest(), head)


# -- weights ---------------------------------------------------------------------------------------

def turn_weights(messages: list[dict], *, fix_weight: float = 2.0, failed_weight: float = 0.0) -> list[float | None]:
    """One weight per message: None for context turns, a float for each assistant turn (see the module doc)."""
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    weights: list[float | None] = [None] * len(messages)
    if not assistant:
        return weights
    last = assistant[-1]
    for i in assistant[:-1]:
        weights[i] = failed_weight
    weights[last] = fix_weight if len(assistant) > 1 else 1.0
    return weights


def _render(tokenizer, messages: list[dict], *, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


@dataclass
class Encoded:
    input_ids: list[int]
    weights: list[float]  # weights[t]: how much predicting token t counts (0 for context)
    kind: str  # fix or first (which weight the final answer got)

    @property
    def n_trained(self) -> int:
        return sum(1 for w in self.weights if w > 0)


def encode(tokenizer, messages: list[dict], weights: list[float | None]) -> Encoded:
    """Tokenize the conversation as the chat template renders it; weigh the tokens of each assistant turn.

    A turn's span runs from the end of the template's generation prompt to the end of the turn, end
    of turn marker included (so the model learns to stop), trailing whitespace excluded.
    """
    full = _render(tokenizer, messages, generation_prompt=False)
    spans: list[tuple[int, int, float]] = []
    for i, w in enumerate(weights):
        if w is None or w <= 0:
            continue
        before = _render(tokenizer, messages[:i], generation_prompt=True)
        through = _render(tokenizer, messages[:i + 1], generation_prompt=False).rstrip()
        if not (full.startswith(before) and full.startswith(through) and len(through) > len(before)):
            raise FinetuneError("The base model's chat template does not render a conversation as a prefix of its "
                                "continuation, so assistant turns cannot be located for the loss. Pick another base "
                                "model (Qwen2.5, SmolLM2 and Llama templates work).")
        spans.append((len(before), len(through), float(w)))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    tw = [0.0] * len(ids)
    for t, (start, end) in enumerate(offsets):
        for s, e, w in spans:
            if s <= start < e:
                tw[t] = w
                break
    kind = "fix" if sum(1 for m in messages if m["role"] == "assistant") > 1 else "first"
    return Encoded(list(ids), tw, kind)


@dataclass
class Prepared:
    rows: list[Encoded]
    too_long: int
    no_target: int
    kinds: dict[str, int]
    tokens: int


def prepare_rows(tokenizer, rows: list[dict], *, max_length: int, fix_weight: float, failed_weight: float) -> Prepared:
    """Encode the SFT rows; rows longer than max_length are left out (cutting them would cut the answer)."""
    out, too_long, no_target = [], 0, 0
    kinds = {"fix": 0, "first": 0}
    for row in rows:
        msgs = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
        e = encode(tokenizer, msgs, turn_weights(msgs, fix_weight=fix_weight, failed_weight=failed_weight))
        if len(e.input_ids) > max_length:
            too_long += 1
            continue
        if not e.n_trained:
            no_target += 1
            continue
        kinds[e.kind] += 1
        out.append(e)
    return Prepared(out, too_long, no_target, kinds, sum(len(e.input_ids) for e in out))


def check_enough(n: int, *, minimum: int, data_dir: str, too_long: int = 0, max_length: int = 0) -> None:
    if n >= minimum:
        return
    extra = (f" ({too_long} more were longer than --max-length {max_length}; raise it to keep them)"
             if too_long else "")
    raise FinetuneError(
        f"Only {n} training rows{extra}, and fine-tuning needs at least {minimum}: an adapter trained on fewer learns "
        f"nothing that carries over. Collect more solved traces (solve problems in the page, or run "
        f"`python -m execfeedback eval TRAIN_PROBLEMS.jsonl --data-dir {data_dir}` on a training problem set), "
        f"or pass --min-rows {max(n, 1)} to train anyway.")
