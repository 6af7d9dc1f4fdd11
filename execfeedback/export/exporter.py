"""Dataset export: the traces as SFT, preference, KTO, trajectory and correction files, with a card.

    report = export_to_dir(store, "out/", options_from_mapping({"format": "all", "outcome": "solved"}))
    chunks, report = stream_export_zip(store, options)     # the page's download: a zip, streamed

Rows stream from one read-only snapshot of the store, one trace at a time, so memory stays flat
(only the 16-byte keys of the duplicate check grow with the number of rows).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
import zipfile
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from dialog import Store
from dialog.completions import iter_completions

from .card import render_card
from .completions import completion_rows
from .tool_rows import iter_loops, tool_rows
from .hygiene import Deduper, Scrubber, TokenCounter, cut, digest
from .options import ExportOptions, options_from_mapping
from .parallel import parallel_trace_pass
from .report import ExportReport, Stats
from .rows import (RowSpec, correction_rows, is_trivial_edit, kto_rows, preference_rows, sft_final_rows, sft_rows,
                   traceback_text, trajectory_rows)
from .schema import FORMATS, SPLITS
from .source import AUTHORS, FilterError, Source, Trace, check_known
from .split import Splitter
from .writers import ExportError, Writers, dumps, require_pyarrow

__all__ = ["ExportError", "ExportOptions", "ExportReport", "export_to_dir", "export_zip", "options_from_mapping",
           "stream_export_zip", "FORMATS"]

SOLVED_ONLY = {"sft", "sft_final", "preference", "corrections"}
MIN_OBSERVATION_CUT = 200
PROMPT_CACHE = 4096
PARALLEL_MIN = 2000  # traces; below this, starting worker processes costs more than it saves


# -- the export --------------------------------------------------------------------------------------

def _manifest_text(raw: Any, scrub) -> str:
    """The manifest without local paths (they name the user's home), as sorted JSON text."""
    try:
        m = json.loads(raw) if isinstance(raw, str) else (raw or {})
    except ValueError:
        m = {}
    if isinstance(m, dict):
        m = {k: (Path(v).name if k == "path" and isinstance(v, str) else v) for k, v in m.items()}
    return scrub(json.dumps(m, ensure_ascii=False, sort_keys=True))


class _Exporter:
    def __init__(self, store: Store, directory: Path, options: ExportOptions, *, secrets: Iterable[str] = (),
                 environ: Mapping[str, str] | None = None, progress: bool = False, workers: int = 1):
        self.store, self.directory, self.o, self.progress = store, Path(directory), options, progress
        self.workers = max(1, int(workers))
        self._edited: set[int] = set()
        self._seen_edited: set[int] = set()
        self._prepared: dict[int, Trace] = {}
        self.scrubber = Scrubber.for_data_dir(store.data_dir, secrets=secrets, environ=environ)
        self.stats = Stats()
        self.dedupers = {f: Deduper(options.dedup) for f in FORMATS}
        self.writers = Writers(self.directory, parquet=options.parquet)
        self.tokens: TokenCounter | None = None
        self._prompt_cache: dict[str, tuple[str, Counter]] = {}
        self._manifests: dict[str, dict] = {}

    # -- texts -------------------------------------------------------------------------------------

    def _scrub_counted(self, text: str) -> tuple[str, Counter]:
        before = Counter(self.scrubber.counts)
        clean = self.scrubber(text)
        return clean, self.scrubber.counts - before

    def _prompt_text(self, text: str) -> str:
        """Scrub a context message; identical ones (the system prompt, cells above) recur across traces."""
        hit = self._prompt_cache.get(text)
        if hit is None:
            if len(self._prompt_cache) >= PROMPT_CACHE:
                self._prompt_cache.clear()
            hit = self._prompt_cache[text] = self._scrub_counted(text)
        else:
            self.scrubber.counts.update(hit[1])  # counts stay per trace, cached or not
        return hit[0]

    def _prepare(self, tr: Trace) -> None:
        """Scrub each exported text of the trace once and cut its observations to the character budget.

        Only what the requested formats write is scrubbed: the code column, for one, only reaches the
        trajectory files (the duplicate keys that read it are never written).
        """
        memo: dict[str, str] = {}
        cuts: dict[str, str] = {}
        budget = self.o.max_observation_chars
        fmts = set(self.o.formats)

        def clean(text: str | None) -> str:
            if not text:
                return text or ""
            out = memo.get(text)
            if out is None:
                out = memo[text] = self.scrubber(text)
            return out

        def observe(text: str | None) -> str:
            if not text:
                return text or ""
            out = cuts.get(text)
            if out is None:
                out, was_cut = cut(clean(text), budget)
                cuts[text] = out
                self.stats.observations_cut += was_cut
            return out

        cut_before = self.stats.observations_cut
        tr.prompt = [{"role": m["role"], "content": self._prompt_text(m["content"])} for m in tr.prompt]
        if fmts & {"sft", "kto", "trajectory"}:
            tr.turns = [[clean(said), observe(obs)] for said, obs in tr.turns]
        every = bool(fmts & {"preference", "kto", "trajectory"})
        details = "trajectory" in fmts
        for a in tr.attempts:
            if every or a is tr.answer:
                a["completion"] = clean(a["completion"])
                if not (a["completion"] or "").strip():  # a human's attempt: the fenced code is the answer
                    a["code"] = clean(a["code"])
            if details:
                a["code"] = clean(a["code"])
                a["feedback"] = observe(a["feedback"])
                a["traceback"] = observe(traceback_text(a["traceback"]))
                for k in ("evalue", "stdout", "stderr"):
                    a[k] = observe(a[k])
                a["checks"] = clean(a["checks"]) if isinstance(a["checks"], str) else a["checks"]
                a["sampling"] = clean(a["sampling"]) if isinstance(a["sampling"], str) else a["sampling"]
        if details:
            tr.row["manifest"] = _manifest_text(tr.row.get("manifest"), clean)
            tr.row["sampling"] = clean(tr.row.get("sampling") or "{}")
        self.stats.traces_with_cut += self.stats.observations_cut > cut_before

    # -- rows --------------------------------------------------------------------------------------

    def _row_tokens(self, fmt: str, row: dict) -> int:
        count = self.tokens.count
        if fmt == "preference":
            return max(count(row["prompt"] + row["chosen"]), count(row["prompt"] + row["rejected"]))
        if fmt == "kto":
            return count(row["prompt"] + row["completion"])
        if fmt == "corrections":
            return count(row["prompt"] + [{"role": "assistant", "content": row["human_code"]}])
        return count(row["messages"])

    def _fit(self, spec: RowSpec, row: dict) -> tuple[dict, bool] | None:
        """(row, cut) within the token budget, observations cut shorter and shorter; None: dropped."""
        limit = self.o.max_tokens_per_row
        n = self._row_tokens(spec.fmt, row)
        self.stats.tokens_max[spec.fmt] = max(self.stats.tokens_max[spec.fmt], n)
        if not limit or n <= limit:
            return row, False
        if spec.has_observations:
            budget = self.o.max_observation_chars or 8000
            while budget >= MIN_OBSERVATION_CUT:
                budget //= 2
                row = spec.make(budget)
                if self._row_tokens(spec.fmt, row) <= limit:
                    return row, True
        self.stats.tokens_dropped[spec.fmt] += 1
        return None

    def finish(self, spec: RowSpec) -> tuple[dict, str, bytes, bool] | None:
        """(row, line, exact key, cut by the token budget), or None when the row cannot fit."""
        row = spec.make(None)
        line = dumps(row)
        exact = digest(line)
        cut_ = False
        if self.tokens is not None:
            fitted = self._fit(spec, row)
            if fitted is None:
                return None
            if fitted[1]:
                row, cut_ = fitted[0], True
                line = dumps(row)
        return row, line, exact, cut_

    def accept(self, fmt: str, split: str, row: dict | None, line: str, exact: bytes, near: bytes, *,
               cut_: bool = False, label: bool | None = None, correction: bool = False) -> bool:
        """Write the row unless it duplicates an earlier one (rows come in trace order in every mode)."""
        if self.dedupers[fmt].seen(exact, near):
            return False
        if row is None and self.writers.parquet:
            row = json.loads(line)
        self.writers.write(fmt, split, row, line)
        if cut_:
            self.stats.tokens_cut[fmt] += 1
        if label is not None:
            self.stats.kto_labels[label] += 1
        if correction and fmt != "corrections":
            self.stats.correction_rows[fmt] += 1
        return True

    def _emit(self, spec: RowSpec, split: str) -> None:
        done = self.finish(spec)
        if done is not None:
            row, line, exact, cut_ = done
            self.accept(spec.fmt, split, row, line, exact, spec.near, cut_=cut_,
                        label=row["label"] if spec.fmt == "kto" else None, correction=spec.correction)

    def _specs(self, tr: Trace) -> Iterator[RowSpec]:
        fmts, role = self.o.formats, self.o.observation_role
        if "sft" in fmts:
            yield from sft_rows(tr, role)
        if "sft_final" in fmts:
            yield from sft_final_rows(tr)
        if "preference" in fmts:
            yield from preference_rows(tr)
        if "kto" in fmts:
            yield from kto_rows(tr, role)
        if "trajectory" in fmts:
            yield from trajectory_rows(tr, role)

    def _manifest_fields(self, m: Any) -> dict:
        """A parsed manifest, cached: every trace of one model carries the same text."""
        key = m if isinstance(m, str) else json.dumps(m, sort_keys=True)
        hit = self._manifests.get(key)
        if hit is None:
            try:
                hit = json.loads(m) if isinstance(m, str) else (m or {})
            except ValueError:
                hit = {}
            hit = self._manifests[key] = hit if isinstance(hit, dict) else {}
        return hit

    def _count_trace(self, tr: Trace) -> None:
        s = self.stats
        s.exported_traces += 1
        s.rebuilt += tr.rebuilt
        if tr.solved:
            s.outcomes[tr.answer["round"] + 1] += 1
        else:
            s.outcomes["unsolved"] += 1
            s.stop_reasons[tr.row["stop_reason"] or "unfinished"] += 1
        man = self._manifest_fields(tr.row.get("manifest"))
        s.models[(tr.row["model"] or "", tr.row["backend"] or "", str(man.get("file_name") or ""),
                  str(man.get("quant") or ""), str(man.get("sha256") or "")[:12])] += 1
        for a in tr.attempts:
            s.attempts += 1
            s.errors[(a["exec_status"], a["ename"] or "")] += 1

    # -- passes ------------------------------------------------------------------------------------

    def run(self) -> ExportReport:
        o, s = self.o, self.stats
        if o.parquet:
            require_pyarrow()
        src = self.source = Source(self.store.reader(), details="trajectory" in o.formats,
                                   request_sql=o.split_by == "dialog")
        try:
            s.store_traces = src.count("SELECT count(*) FROM traces")
            s.store_edits = src.count("SELECT count(*) FROM edits")
            s.store_completions = src.count("SELECT count(*) FROM completions")
            s.store_tool_loops = src.count("SELECT count(*) FROM tool_steps WHERE step = 0")
            if not s.store_traces and not s.store_edits and not s.store_completions and not s.store_tool_loops:
                raise ExportError(f"The store at {self.store.data_dir} has no traces yet: solve a prompt in the page or "
                                  "run `python -m execfeedback eval`, then export again.")
            try:
                check_known(src.conn, o.filters, o.exclude_eval_runs)
            except FilterError as e:
                raise ExportError(str(e)) from None
            if o.tokenizer_gguf:
                self.tokens = _load_tokenizer(o.tokenizer_gguf)
            s.unfinished = src.count("SELECT count(*) FROM traces WHERE finished_at IS NULL")
            forced = src.eval_run_tasks(o.exclude_eval_runs)
            links = list(src.task_links()) if o.split_by == "dialog" else []
            self.splitter = Splitter(by=o.split_by, test_fraction=o.test_fraction, seed=o.seed, forced_tasks=forced,
                                     links=links)
            del links
            edits = []
            if "human_edit" in (o.filters.authors or AUTHORS) and {"sft", "sft_final", "corrections"} & set(o.formats):
                edits = self._edit_groups(src)
            self._edited = {tid for _, tid in edits if tid is not None}
            if set(o.filters.authors or AUTHORS) - {"human_edit"}:
                self._trace_pass(src)
            self._edit_pass(src, edits)
            if "completions" in o.formats:
                self._completion_pass(src)
            if "tools" in o.formats:
                self._tool_pass(src)
        finally:
            self.writers.close()
            src.close()
        if not self.writers.counts:
            raise ExportError(self._nothing_message())
        sp, tok = self.splitter, self.tokens
        report = ExportReport(files=self.writers.files(), rows=dict(self.writers.counts), card="", stats=s,
                              dedup={f: (d.exact, d.near) for f, d in self.dedupers.items()},
                              secrets=dict(self.scrubber.counts), directory=self.directory, tasks=sp.tasks,
                              options=o, schema_version=self.store.schema_version,
                              literal_secrets=dict(self.scrubber.literal_sources),
                              tokenizer=None if tok is None else (tok.name, tok.exact_template),
                              groups={k: len(v) for k, v in sp.groups.items()}, forced_tasks=len(sp.forced_tasks))
        report.card = render_card(report)
        (self.directory / "README.md").write_text(report.card, encoding="utf-8")
        return report

    def _trace_pass(self, src: Source) -> None:
        o, s = self.o, self.stats
        if not set(o.formats) - {"corrections", "completions", "tools"}:
            return
        where, params = o.filters.where(solved_only=set(o.formats) <= SOLVED_ONLY)
        s.matched = src.count_traces(where, params)
        from tqdm import tqdm

        bar = tqdm(total=s.matched, unit="trace", desc="export", disable=not self.progress, file=sys.stderr,
                   mininterval=0.5, dynamic_ncols=True)
        try:
            if self.workers > 1 and s.matched >= PARALLEL_MIN:
                parallel_trace_pass(self, where, params, bar)
                return
            for tr, split in self.traces(src, where, params, on_trace=lambda: bar.update(1)):
                for spec in self._specs(tr):
                    self._emit(spec, split)
        finally:
            bar.close()

    def traces(self, src: Source, where: str, params: list, on_trace=None) -> Iterator[tuple[Trace, str]]:
        """The prepared traces that pass every filter, with their split, counted in the stats."""
        s = self.stats
        authors = set(self.o.filters.authors or AUTHORS)
        for trow in src.trace_rows(where, params):
            if on_trace is not None:
                on_trace()
            tr = src.load(trow)
            if tr is None:
                s.no_attempts += 1
                continue
            if tr.author not in authors:
                s.author_skipped += 1
                continue
            self._prepare(tr)
            self._count_trace(tr)
            if tr.row["id"] in self._edited:
                self._prepared[tr.row["id"]] = tr  # its corrections reuse it, scrubbed (and counted) once
            yield tr, self.splitter.split(trow["dialog_id"], tr.task)

    def _edit_groups(self, src: Source) -> list[tuple[list[dict], int | None]]:
        """Human edits per cell with the trace they correct (edits are few: they are typed by hand)."""
        out = []
        for group in src.edit_groups():
            if is_trivial_edit(group):
                self.stats.edits_trivial += 1
                continue
            out.append((group, src.trace_for_edits(group)))
        return out

    def _edit_pass(self, src: Source, edits: list[tuple[list[dict], int | None]]) -> None:
        s = self.stats
        where, params = self.o.filters.where()
        for group, trace_id in edits:
            if trace_id is None:
                s.edits_no_trace += 1
                continue
            tr = self._prepared.get(trace_id)
            if tr is None:
                tr = src.load_by_id(trace_id, where, params)
                if tr is None:
                    s.edits_filtered += 1
                    continue
                counted = Counter(self.scrubber.counts)
                self._prepare(tr)
                if trace_id in self._seen_edited:  # a worker process exported (and counted) it already
                    self.scrubber.counts = counted
                self._prepared[trace_id] = tr
            split = self.splitter.split(tr.row["dialog_id"], tr.task)
            for spec in correction_rows(tr, group, self.scrubber):
                if spec.fmt in self.o.formats:
                    self._emit(spec, split)

    def _table_where(self) -> tuple[str, tuple]:
        """The dialog and time filters as SQL over a table with dialog_id and created_at (completions, tool_steps)."""
        f = self.o.filters
        clauses, params = ["1"], []
        if f.dialogs:
            clauses.append(f"dialog_id IN ({', '.join('?' * len(f.dialogs))})")
            params.extend(f.dialogs)
        for op, when in ((">=", f.since), ("<", f.until)):
            if when:
                clauses.append(f"created_at {op} ?")
                params.append(when)
        return " AND ".join(clauses), tuple(params)

    def _tool_pass(self, src: Source) -> None:
        """The tool loops (tool_rows.py), filtered by dialog and time, split by dialog and prompt cell."""
        where, params = self._table_where()
        for row in tool_rows(src.conn, iter_loops(src.conn, where, params), self.scrubber):
            line = dumps(row)
            near = digest("tools", row["tools"], *[m["role"] + ":" + m["content"] + json.dumps(m["tool_calls"])
                                                   for m in row["messages"]])
            self.accept("tools", self.splitter.split(row["dialog_id"], f"cell-{row['message_id']}"), row, line,
                        digest(line), near)

    def _completion_pass(self, src: Source) -> None:
        """The completions table's rows (completions.py), filtered by dialog and time, split by dialog and cell."""
        s = self.stats
        where, params = self._table_where()
        def counted(rows):
            for r in rows:
                s.completion_outcomes[r["outcome"] or "undecided"] += 1
                yield r

        for row in completion_rows(counted(iter_completions(src.conn, where, params)),
                                   self.scrubber):
            line = dumps(row)
            near = digest(row["kind"], row["prefix"][-2000:], row["suffix"][:2000], row["chosen"], row["rejected"])
            self.accept("completions", self.splitter.split(row["dialog_id"], f"cell-{row['message_id']}"), row, line,
                        digest(line), near)

    def _nothing_message(self) -> str:
        s, o = self.stats, self.o
        if set(o.formats) == {"tools"}:
            return (f"No tool loops to export: the store has {s.store_tool_loops} prompts that offered kernel functions "
                    "(&`fn`); a row needs one whose loop ended in an answer.")
        if set(o.formats) == {"completions"}:
            got = ", ".join(f"{n} {k}" for k, n in sorted(s.completion_outcomes.items())) or "none matched"
            return (f"No completions to export: the store has {s.store_completions} ghost-text suggestions ({got}); "
                    "fim rows need accepted ones, preference rows a dropped one followed by an accepted one in the "
                    "same cell.")
        described = "; ".join(o.filters.described())
        if set(o.formats) == {"corrections"} or set(o.filters.authors) == {"human_edit"}:
            return (f"No human corrections to export: the store has {s.store_edits} edits ({s.edits_trivial} "
                    f"whitespace-only, {s.edits_no_trace} without a trace, {s.edits_filtered} left out by the filters: "
                    f"{described}).")
        if s.matched == 0:
            extra = f" ({s.unfinished} unfinished traces are left out; add --include-unfinished)" \
                if s.unfinished and not o.filters.include_unfinished else ""
            return (f"No traces match these filters ({described}). The store has {s.store_traces} traces{extra}. "
                    "Loosen the filters and export again.")
        wanted = ", ".join(o.formats)
        return (f"Nothing to write for --format {wanted}: {s.matched} traces matched ({described}) but none gave a "
                f"row ({s.outcomes.get('unsolved', 0)} unsolved; sft, sft_final and preference need solved traces; "
                f"{s.author_skipped} left out by --author; {s.tokens_dropped.total()} rows over the token budget). "
                "Choose other formats or filters.")


def _load_tokenizer(path: str) -> TokenCounter:
    p = Path(path).expanduser()
    if not p.is_file():
        raise ExportError(f"--tokenizer-gguf {path}: no such file. Give the path of a GGUF model file.")
    try:
        return TokenCounter(p)
    except ImportError:
        raise ExportError("--tokenizer-gguf needs llama-cpp-python (pip install llama-cpp-python).") from None
    except Exception as e:  # noqa: BLE001 - llama.cpp reports a bad file as a bare ValueError/RuntimeError
        raise ExportError(f"--tokenizer-gguf {path}: could not read its vocabulary ({e}). Is it a GGUF file?") \
            from None


# -- public entry points -------------------------------------------------------------------------------

_OUR_FILES = re.compile(r"^(?:%s)\.(?:%s)\.(?:jsonl|parquet)$|^README\.md$" % ("|".join(FORMATS), "|".join(SPLITS)))


def export_to_dir(store: Store, out: str | os.PathLike, options: ExportOptions | None = None, *,
                  force: bool = False, progress: bool = False, secrets: Iterable[str] = (),
                  environ: Mapping[str, str] | None = None, workers: int = 1) -> ExportReport:
    """Write <format>.<split>.jsonl (or .parquet) and README.md into `out`.

    A non-empty `out` is refused unless `force`; then only files of an earlier export (the names
    above) are replaced, and anything else in it is left alone. The files appear only when the whole
    export succeeded. `secrets` are extra strings to scrub (the app passes its token). `workers` > 1
    forks worker processes for large stores (the CLI does; a threaded server should not).
    """
    options = options or ExportOptions()
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is a file. Give a directory (it is created when missing).")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ExportError(f"--out {out} already exists and is not empty. Pass --force to replace an earlier export "
                          "there (other files are kept), or choose another directory.")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".loopbook-export-", dir=out))
    try:
        report = _Exporter(store, work, options, secrets=secrets, environ=environ, progress=progress,
                           workers=workers).run()
        for old in out.iterdir():
            if old.is_file() and _OUR_FILES.match(old.name):
                old.unlink()
        for new in work.iterdir():
            os.replace(new, out / new.name)
        report.directory = out
        return report
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)


def stream_export_zip(store: Store, options: ExportOptions | None = None, *, secrets: Iterable[str] = (),
                      chunk_size: int = 1 << 16, folder: str | None = None) -> tuple[Iterator[bytes], ExportReport]:
    """Export into a zip and return (chunks, report); errors raise here, before the first chunk.

    The zip is built in a temporary file that is already unlinked, so nothing is left on disk
    whether or not the chunks are consumed.
    """
    folder = folder or "loopbook-export-" + datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    tmp = Path(tempfile.mkdtemp(prefix="loopbook-zip-"))
    try:
        report = export_to_dir(store, tmp / "data", options, secrets=secrets)
        zpath = tmp / "export.zip"
        with zipfile.ZipFile(zpath, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as z:
            for name in ["README.md", *report.files]:
                z.write(tmp / "data" / name, f"{folder}/{name}")
        handle = open(zpath, "rb")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    def chunks() -> Iterator[bytes]:
        with handle:
            while block := handle.read(chunk_size):
                yield block

    return chunks(), report


def export_zip(store: Store, options: ExportOptions | None = None, *, secrets: Iterable[str] = ()) -> bytes:
    """The whole export as one zip in memory (for small stores; the page should stream instead)."""
    chunks, _ = stream_export_zip(store, options, secrets=secrets)
    return b"".join(chunks)
