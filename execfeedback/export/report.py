"""What an export found and wrote: Stats, gathered as the rows stream, and the ExportReport the card renders."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, fields
from pathlib import Path

from .options import ExportOptions


@dataclass
class Stats:
    """Everything the card reports, gathered while the rows stream."""

    store_traces: int = 0
    store_edits: int = 0
    store_completions: int = 0
    store_tool_loops: int = 0
    completion_outcomes: Counter = field(default_factory=Counter)
    unfinished: int = 0
    matched: int = 0
    exported_traces: int = 0
    no_attempts: int = 0
    author_skipped: int = 0
    rebuilt: int = 0
    attempts: int = 0
    outcomes: Counter = field(default_factory=Counter)
    stop_reasons: Counter = field(default_factory=Counter)
    models: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)
    kto_labels: Counter = field(default_factory=Counter)
    observations_cut: int = 0
    traces_with_cut: int = 0
    tokens_cut: Counter = field(default_factory=Counter)
    tokens_dropped: Counter = field(default_factory=Counter)
    tokens_max: Counter = field(default_factory=Counter)
    correction_rows: Counter = field(default_factory=Counter)
    edits_no_trace: int = 0
    edits_filtered: int = 0
    edits_trivial: int = 0


@dataclass
class ExportReport:
    files: dict[str, int]
    rows: dict[tuple[str, str], int]
    card: str
    stats: Stats
    dedup: dict[str, tuple[int, int]]
    secrets: dict[str, int]
    directory: Path | None = None
    tasks: dict[str, set[str]] = field(default_factory=dict)  # the task keys the split put in train and test
    # The rest of what the card says:
    options: ExportOptions | None = None
    schema_version: int = 0                                       # of the store read
    literal_secrets: dict[str, int] = field(default_factory=dict)  # literal values scrubbed, by kind
    tokenizer: tuple[str, bool] | None = None  # the token budget's vocabulary file, and whether its template applied
    groups: dict[str, int] = field(default_factory=dict)          # split groups in train and in test
    forced_tasks: int = 0                                         # tasks the excluded eval runs keep in test


def merge_stats(into: Stats, other: Stats) -> None:
    """Add a worker's stats to the parent's (the longest row is a maximum, not a sum)."""
    for f in fields(into):
        a, b = getattr(into, f.name), getattr(other, f.name)
        if f.name == "tokens_max":
            for k, v in b.items():
                a[k] = max(a[k], v)
        elif isinstance(a, Counter):
            a.update(b)
        else:
            setattr(into, f.name, a + b)
