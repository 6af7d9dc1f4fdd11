"""Export options: what to export and how, from CLI arguments or query parameters, validated in one place."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from .schema import FORMATS
from .source import AUTHORS, OUTCOMES, Filters, FilterError, parse_when
from .writers import ExportError

OBSERVATION_ROLES = ("user", "tool")
SPLIT_BY = ("task", "dialog")
DEDUP_MODES = ("near", "exact", "none")


@dataclass
class ExportOptions:
    """What to export and how; `options_from_mapping` builds one from CLI or query-string values."""

    formats: tuple[str, ...] = FORMATS
    observation_role: str = "user"
    parquet: bool = False
    filters: Filters = field(default_factory=Filters)
    dedup: str = "near"
    max_observation_chars: int = 4000
    max_tokens_per_row: int | None = None
    tokenizer_gguf: str | None = None
    split_by: str = "task"
    test_fraction: float = 0.1
    seed: int = 0
    exclude_eval_runs: tuple[str, ...] = ()


# -- options from flat values (CLI arguments, query parameters) --------------------------------------

_KEYS = {
    "format": "formats", "formats": "formats", "observation_role": "observation_role", "parquet": "parquet",
    "outcome": "outcome", "min_rounds": "min_rounds", "max_rounds": "max_rounds", "model": "models",
    "backend": "backends", "dialog": "dialogs", "eval_run": "eval_runs", "since": "since", "until": "until",
    "author": "authors", "include_unfinished": "include_unfinished", "dedup": "dedup",
    "max_observation_chars": "max_observation_chars", "max_tokens_per_row": "max_tokens_per_row",
    "tokenizer_gguf": "tokenizer_gguf", "split_by": "split_by", "test_fraction": "test_fraction", "seed": "seed",
    "exclude_eval_run": "exclude_eval_runs",
}


def _values(v: Any) -> list[str]:
    """A list of non-empty strings from a value, a list of values, or comma-separated text."""
    items = v if isinstance(v, (list, tuple)) else [v]
    out = []
    for item in items:
        if item is None:
            continue
        out.extend(p.strip() for p in str(item).split(",") if p.strip())
    return out


def _one(v: Any) -> str | None:
    vals = v if isinstance(v, (list, tuple)) else [v]
    vals = [x for x in vals if x is not None and str(x).strip() != ""]
    return str(vals[-1]).strip() if vals else None


def _choice(flag: str, v: Any, choices: tuple[str, ...]) -> str | None:
    s = _one(v)
    if s is not None and s not in choices:
        raise ExportError(f"{flag} must be one of {', '.join(choices)}; got {s!r}.")
    return s


def _int(flag: str, v: Any, minimum: int | None = 0) -> int | None:
    s = _one(v)
    if s is None:
        return None
    try:
        n = int(s)
    except ValueError:
        raise ExportError(f"{flag} must be a whole number; got {s!r}.") from None
    if minimum is not None and n < minimum:
        raise ExportError(f"{flag} must be at least {minimum}; got {n}.")
    return n


def _bool(v: Any) -> bool:
    s = _one(v)
    return s is not None and s.lower() not in ("0", "false", "no", "off")


def add_trace_filters(group) -> None:
    """The flags that choose traces, for each command that exports them (export, finetune)."""
    group.add_argument("--min-rounds", type=int, help="at least this many rounds (1: done at the first round)")
    group.add_argument("--max-rounds", type=int, help="at most this many rounds")
    group.add_argument("--model", action="append", help="model name (repeatable)")
    group.add_argument("--backend", action="append", help="llama, anthropic or openai (repeatable)")
    group.add_argument("--dialog", action="append", help="dialog id (repeatable)")
    group.add_argument("--eval-run", action="append", help="only traces of this eval run (repeatable)")
    group.add_argument("--since", help="traces started on or after this date (YYYY-MM-DD or ISO time, UTC)")
    group.add_argument("--until", help="traces started on or before this date (a whole day) or before this ISO time")
    group.add_argument("--author", action="append", help="model, human or human_edit: who wrote the exported code")


def options_from_mapping(values: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> ExportOptions:
    """ExportOptions from flat values: CLI arguments or query parameters (`min-rounds` or `min_rounds`).

    Values may be strings, lists of strings (repeated parameters) or comma-separated strings; an
    unknown key or a bad value raises ExportError naming what is allowed.
    """
    pairs = values.items() if isinstance(values, Mapping) else values
    v: dict[str, list] = {}
    for key, value in pairs:
        name = _KEYS.get(str(key).replace("-", "_"))
        if name is None:
            raise ExportError(f"Unknown export option {key!r}. Known: {', '.join(sorted(set(_KEYS) - {'formats'}))}.")
        if value is None or value is False and name not in ("parquet", "include_unfinished"):
            continue
        v.setdefault(name, []).extend(value if isinstance(value, (list, tuple)) else [value])
    opts = ExportOptions()
    if "formats" in v:
        formats = _values(v["formats"])
        if "all" in formats:
            formats = list(FORMATS)
        bad = [f for f in formats if f not in FORMATS]
        if bad or not formats:
            raise ExportError(f"--format must be one or more of {', '.join(FORMATS)} or all; got {', '.join(bad)}.")
        opts.formats = tuple(f for f in FORMATS if f in formats)
    opts.observation_role = _choice("--observation-role", v.get("observation_role"), OBSERVATION_ROLES) or "user"
    opts.parquet = _bool(v.get("parquet"))
    opts.dedup = _choice("--dedup", v.get("dedup"), DEDUP_MODES) or "near"
    chars = _int("--max-observation-chars", v.get("max_observation_chars"))
    opts.max_observation_chars = 4000 if chars is None else chars
    opts.max_tokens_per_row = _int("--max-tokens-per-row", v.get("max_tokens_per_row"), minimum=16)
    opts.tokenizer_gguf = _one(v.get("tokenizer_gguf"))
    opts.split_by = _choice("--split-by", v.get("split_by"), SPLIT_BY) or "task"
    frac = _one(v.get("test_fraction"))
    if frac is not None:
        try:
            opts.test_fraction = float(frac)
        except ValueError:
            raise ExportError(f"--test-fraction must be a number from 0 to 1; got {frac!r}.") from None
        if not 0.0 <= opts.test_fraction <= 1.0:
            raise ExportError(f"--test-fraction must be from 0 to 1; got {frac}.")
    seed = _int("--seed", v.get("seed"), minimum=None)
    opts.seed = opts.seed if seed is None else seed
    opts.exclude_eval_runs = tuple(_values(v.get("exclude_eval_runs")))

    f = opts.filters
    f.outcome = _choice("--outcome", v.get("outcome"), OUTCOMES) or "all"
    f.min_rounds = _int("--min-rounds", v.get("min_rounds"), minimum=1)
    f.max_rounds = _int("--max-rounds", v.get("max_rounds"), minimum=1)
    if f.min_rounds and f.max_rounds and f.min_rounds > f.max_rounds:
        raise ExportError(f"--min-rounds ({f.min_rounds}) is more than --max-rounds ({f.max_rounds}).")
    f.models = tuple(_values(v.get("models")))
    f.backends = tuple(_values(v.get("backends")))
    try:
        f.dialogs = tuple(int(d) for d in _values(v.get("dialogs")))
    except ValueError:
        raise ExportError(f"--dialog takes dialog ids (whole numbers); got {', '.join(_values(v.get('dialogs')))}.") \
            from None
    f.eval_runs = tuple(_values(v.get("eval_runs")))
    try:
        f.since = parse_when(_one(v["since"]), flag="--since") if _one(v.get("since")) else None
        f.until = parse_when(_one(v["until"]), end=True, flag="--until") if _one(v.get("until")) else None
    except FilterError as e:
        raise ExportError(str(e)) from None
    if f.since and f.until and f.since >= f.until:
        raise ExportError("--since is not before --until: no trace can match.")
    f.authors = tuple(_values(v.get("authors")))
    bad = [a for a in f.authors if a not in AUTHORS]
    if bad:
        raise ExportError(f"--author must be one or more of {', '.join(AUTHORS)}; got {', '.join(bad)}.")
    f.include_unfinished = _bool(v.get("include_unfinished"))
    if opts.max_tokens_per_row and not opts.tokenizer_gguf:
        raise ExportError("--max-tokens-per-row needs a tokenizer: pass --tokenizer-gguf PATH (any GGUF of the "
                          "model you will train; only its vocabulary is loaded).")
    return opts
