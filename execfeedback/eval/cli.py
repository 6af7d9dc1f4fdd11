"""`python -m execfeedback eval`: the Solve loop over a problem file, scored on hidden tests, pass@1 per round.

    python -m execfeedback eval PROBLEMS.jsonl --model qwen2.5-coder-1.5b --rounds 3

Problem files are JSON Lines, one problem per line, in the format problems.py describes; the shipped set is
`execfeedback/eval/problem_sets/loopbook-30.jsonl`.

With `--adapter A` the command compares: problems whose id is one of A's training tasks are left out,
the base model runs the rest first (run `NAME-base`, or the base settings' default name; resumable,
skipped with `--no-base`), then base + adapter, then a side-by-side table, recorded on A's card.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

from dialog import InvalidInput, Store, StoreError
from dialog.store import default_data_dir
from local_model import Engine, ModelError, load_backend

from ..adapters.registry import get, record_eval, resolve_adapter
from ..traces import TraceStore
from ..settings import add_arguments as add_setting_arguments
from ..settings import check
from .problems import SHIPPED, Problem, load_problems
from .runner import (RESULT_KEYS, EvalRunner, EvalSettings, file_sha256, finished_traces, format_comparison,
                     format_table, problem_result, summarize)

HELP = "run the loop over a problem file and score pass@1 per round on hidden tests (resumable)"
SAMPLED = ("max_tokens", "temperature", "seed")  # the settings an eval samples with
EXIT_OK, EXIT_LINE_ERRORS, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The `eval` subcommand's options."""
    p = parser
    p.add_argument("problems", nargs="?", default=str(SHIPPED),
                   help=f"a .jsonl problem file (default: the shipped {SHIPPED.name})")
    add_setting_arguments(p, "rounds", "candidates", "retry_candidates", "retry_fresh", "select_inputs", "retry",
                          "repeat_resamples")
    p.add_argument("--model", default="default",
                   help="a model name (`python -m local_model list`), a GGUF path, or a served model name")
    p.add_argument("--adapter", default=None,
                   help="a registered LoRA adapter (`python -m execfeedback adapter list`) to run on the base model")
    p.add_argument("--backend", choices=("llama", "anthropic", "openai"), default=None,
                   help="default: guessed from --model and --base-url")
    p.add_argument("--no-base", action="store_true",
                   help="with --adapter: run only the adapter, not the base model beside it")
    p.add_argument("--base-url", default=None, help="an OpenAI-compatible server, e.g. http://127.0.0.1:8080/v1")
    p.add_argument("--n-ctx", type=int, default=4096, help="context window for the in-process model")
    add_setting_arguments(p, *SAMPLED)
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per execution (default 10)")
    p.add_argument("--concurrency", type=int, default=1,
                   help="problems at once, one kernel each; pays off with an OpenAI-compatible server")
    p.add_argument("--memory-mb", type=int, default=2048, help="memory limit of each eval kernel (default 2048)")
    p.add_argument("--cpu-seconds", type=int, default=600, help="CPU-time limit of each eval kernel (default 600)")
    p.add_argument("--limit", type=int, default=None, help="run only the first N problems")
    p.add_argument("--data-dir", default=None,
                   help="the store the traces go to (default: $LOOPBOOK_DATA_DIR or ~/.loopbook); models are "
                        "looked up in DATA_DIR/models when that folder exists, else in the default data dir")
    p.add_argument("--name", default=None,
                   help="eval run name (default: from the problem file, model and settings); the same name resumes")
    p.add_argument("--out", default=None, help="results JSON (default: DATA_DIR/evals/NAME.json)")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no per-problem lines")
    return parser


def _fail(message: str, code: int = EXIT_USAGE) -> int:
    print(f"error: {message}", file=sys.stderr, flush=True)
    return code


def _failed(message: str) -> tuple[int, None]:
    return _fail(message), None


def _settings(args: argparse.Namespace) -> EvalSettings:
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(EvalSettings)}
    return EvalSettings(**{**given, "problems": Path(args.problems).name, "model": str(args.model)})


def _check_numbers(args: argparse.Namespace) -> str | None:
    checks = [(args.concurrency >= 1, "--concurrency must be at least 1"),
              (args.limit is None or args.limit >= 1, "--limit must be at least 1"),
              (args.n_ctx >= 256, "--n-ctx must be at least 256"),
              (args.memory_mb >= 256, "--memory-mb must be at least 256"),
              (args.cpu_seconds >= 10, "--cpu-seconds must be at least 10")]
    try:  # the sampling flags as the settings table has them (the loop's: settings.loop_config())
        check({k: getattr(args, k) for k in SAMPLED})
    except InvalidInput as e:
        checks.append((False, f"{e} (see --help)"))
    return next((msg for ok, msg in checks if not ok), None)


def _model_data_dir(data_dir: Path) -> Path | None:
    return data_dir if (data_dir / "models").is_dir() else None


def run(args: argparse.Namespace) -> int:
    """Run (or resume) an eval; prints the table, writes the results JSON. Exit 0 done, 1 done with bad
    problem lines skipped, 2 bad usage (no problem file, no model, a name taken by other settings), 130 Ctrl-C."""
    t_start = time.perf_counter()
    bad = _check_numbers(args)
    if bad:
        return _fail(bad)
    settings = _settings(args)
    try:
        settings.loop_config()
    except ValueError as e:
        return _fail(f"{e} (see --help)")
    try:
        problems, line_errors = load_problems(args.problems)
    except FileNotFoundError as e:
        return _fail(str(e))
    except (OSError, UnicodeDecodeError) as e:
        return _fail(f"cannot read the problem file {args.problems}: {e}")
    if getattr(args, "no_base", False) and not settings.adapter:
        return _fail("--no-base goes with --adapter (it skips the base model's run beside the adapter's)")
    for err in line_errors:
        print(f"error: {err} (this problem is skipped; fix the line and run the same command again to add it)",
              file=sys.stderr, flush=True)
    if not problems:
        return _fail(f"no problem could be loaded from {args.problems}; see the line errors above")

    data_dir = default_data_dir(args.data_dir)
    store = Store(data_dir)
    try:
        if settings.adapter:
            return _compare(args, settings, store, problems, line_errors, t_start)
        return _run_with_store(args, settings, store, problems[:args.limit] if args.limit else problems,
                               line_errors, t_start)[0]
    except KeyboardInterrupt:  # before the problems started (loading the model): nothing to keep
        print("Interrupted before any problem ran; nothing was lost. Run the same command again.",
              file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    finally:
        store.close()


def _run_with_store(args, settings: EvalSettings, store: Store, problems: list[Problem], line_errors, t_start, *,
                    comparison: dict | None = None) -> tuple[int, dict | None]:
    """One eval run: (exit code, results; None when it never started). `comparison` goes into the results."""
    traces = TraceStore(store)
    name = args.name or settings.default_name()
    sha = file_sha256(args.problems)
    config = {**settings.result_config(), "loop": settings.loop_config().as_dict()}
    er = traces.start_eval_run(name, problems_path=str(Path(args.problems).resolve()), problems_sha256=sha,
                               config=config)
    old = {k: (er.get("config") or {}).get(k) for k in RESULT_KEYS}
    diff = [k for k in RESULT_KEYS if k in (er.get("config") or {}) and old[k] != config[k]]
    if diff:
        said = ", ".join(f"{k}: {old[k]!r} then, {config[k]!r} now" for k in diff)
        return _failed(f"eval run {name!r} already exists with other settings ({said}); "
                     "resume it with the same settings or pass a new --name")
    if er.get("problems_sha256") and er["problems_sha256"] != sha:
        print(f"note: {Path(args.problems).name} changed since run {name!r} started; finished problems are kept "
              "by id, the rest run now", file=sys.stderr)

    runner_log = lambda text: print(text, file=sys.stderr, flush=True)
    # A run killed hard leaves traces 'running': they are not results, the problems run again.
    for r in store.query("SELECT id FROM traces WHERE eval_run_id = ? AND status = 'running'", (er["id"],)):
        traces.finish_trace(r["id"], status="stopped", stop_reason="stopped")
    done = finished_traces(traces, er["id"])
    todo = [p for p in problems if p.id not in done]
    resumed = [p for p in problems if p.id in done]
    if resumed:
        runner_log(f"Resuming eval run {name!r}: {len(resumed)} problem(s) already done, {len(todo)} to run.")

    runner = None
    manifest: dict = {}
    if todo:
        lora_path, adapter_entry = None, {}
        if settings.adapter:
            try:
                # The base's sha256 is checked first: llama.cpp crashes on an adapter for another base.
                lora_path, adapter_entry = resolve_adapter(store, settings.adapter, model=settings.model,
                                                           data_dir=_model_data_dir(store.data_dir))
            except (StoreError, ValueError, LookupError) as e:
                return _failed(f"adapter {settings.adapter!r}: {e}")
        try:
            backend = load_backend(settings.model, settings.backend, base_url=settings.base_url, n_ctx=settings.n_ctx,
                                   data_dir=_model_data_dir(store.data_dir), lora_path=lora_path)
        except ModelError as e:
            return _failed(f"{e}")
        engine = Engine(backend)
        engine.manifest.update(adapter_entry)
        manifest = dict(engine.manifest)
        if manifest.get("note"):
            runner_log(f"note: {manifest['note']}")
        runner = EvalRunner(engine, traces, settings, er["id"], progress=not args.quiet,
                            log=(lambda _t: None) if args.quiet else runner_log)
        source = f"eval:{Path(args.problems).name}"
        try:
            asyncio.run(runner.run(todo, source=source, done=len(resumed), total=len(problems)))
        except KeyboardInterrupt:
            runner.interrupted = True
        finally:
            engine.close()

    results_by_id: dict[str, dict] = {}
    all_attempts: list[dict] = []
    for p in problems:
        if runner is not None and p.id in runner.results:
            results_by_id[p.id] = {**runner.results[p.id], "resumed": False}
        elif p.id in done:
            trace = traces.get_trace(done[p.id]["id"], with_inputs=False)
            results_by_id[p.id] = {**problem_result(p.id, trace, trace["attempts"], settings.rounds), "resumed": True}
            manifest = manifest or trace.get("manifest") or {}
        else:
            continue
        tid = results_by_id[p.id]["trace_id"]
        if tid is not None:
            all_attempts.extend(traces.attempts(tid))
    per_problem = [results_by_id[p.id] for p in problems if p.id in results_by_id]
    interrupted = bool(runner and runner.interrupted)
    summary = summarize(per_problem, all_attempts, runner.overheads if runner else [],
                        wall_s=time.perf_counter() - t_start)
    summary.update({
        "run_name": name, "run_id": er["id"], "complete": len(per_problem) == len(problems),
        "n_selected": len(problems), "n_pending": len(problems) - len(per_problem),
        "n_resumed": sum(1 for r in per_problem if r["resumed"]),
        "model": manifest.get("model") or settings.model, "manifest": manifest,
        "config": {**settings.result_config(), "concurrency": settings.concurrency, "limit": settings.limit,
                   "memory_mb": settings.memory_mb, "cpu_seconds": settings.cpu_seconds,
                   "loop": settings.loop_config().as_dict()},
        "problems_path": str(Path(args.problems).resolve()), "problems_sha256": sha, "data_dir": str(store.data_dir),
        "line_errors": [str(e) for e in line_errors],
    })
    results = {"summary": summary, "problems": per_problem}
    if comparison is not None:
        results["comparison"] = {**comparison, "adapter_pass_by_round": summary["pass_by_round"]}
    out = Path(args.out).expanduser() if args.out else store.data_dir / "evals" / f"{_safe(name)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=2, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, out)
    traces.finish_eval_run(er["id"], summary, status="done" if summary["complete"] else "interrupted")
    print(format_table(results), flush=True)
    print(f"results: {out}", flush=True)
    if runner is not None and runner.model_failed:
        return _fail(f"the model answered no attempt for two problems in a row; check that {settings.model!r} "
                     f"works (`python -m local_model manifest`, or the server at --base-url), then run the same "
                     f"command again to resume (run name {name!r})"), results
    if interrupted or not summary["complete"]:
        print(f"Interrupted. Resume with the same command (run name {name!r}).", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED, results
    return (EXIT_LINE_ERRORS if line_errors else EXIT_OK), results


# -- base beside adapter ----------------------------------------------------------------------------

def _left_out(problems: list[Problem], record: dict) -> tuple[list[Problem], list[str] | None]:
    """The problems that are not the adapter's training tasks, and the ids left out (None: it cannot tell)."""
    train = (record.get("export") or {}).get("train_tasks")
    if train is None:
        return problems, None
    train = set(train)
    return [p for p in problems if p.id not in train], [p.id for p in problems if p.id in train]


def _compare(args, settings: EvalSettings, store: Store, problems: list[Problem], line_errors, t_start) -> int:
    """`eval --adapter A`: held-out problems only, the base model first (unless --no-base), then A, side by side."""
    name = settings.adapter
    try:
        record = get(store, name)
        # Checked before either run: a base run is wasted when the adapter cannot load onto this model.
        resolve_adapter(store, name, model=settings.model, data_dir=_model_data_dir(store.data_dir))
    except (StoreError, ValueError, LookupError) as e:
        return _fail(f"adapter {name!r}: {e}")
    problems, left = _left_out(problems, record)
    if left is None:
        print(f"note: adapter {name!r} does not record its training tasks (registered before they were recorded, "
              "or trained on a given --export): cannot check that these problems were held out of its training.",
              file=sys.stderr, flush=True)
    elif left:
        more = f" and {len(left) - 5} more" if len(left) > 5 else ""
        print(f"note: left out {len(left)} problem(s) that adapter {name!r} was trained on: "
              f"{', '.join(left[:5])}{more}", file=sys.stderr, flush=True)
    if not problems:
        return _fail(f"every problem in {Path(args.problems).name} is a training task of adapter {name!r}; "
                     "evaluate on held-out problems (tasks the export put in test, or another problem file)")
    if args.limit:
        problems = problems[:args.limit]
    comparison = {"base_run": None, "base_pass_by_round": None, "left_out_train_tasks": left}
    base = None
    if not getattr(args, "no_base", False):
        base_settings = dataclasses.replace(settings, adapter=None)
        base_name = f"{args.name}-base" if args.name else base_settings.default_name()
        print(f"Base model alone first (run {base_name!r}), then with adapter {name!r}.", file=sys.stderr, flush=True)
        base_args = argparse.Namespace(**{**vars(args), "adapter": None, "name": base_name, "out": None})
        code, base = _run_with_store(base_args, base_settings, store, problems, line_errors, t_start)
        if code not in (EXIT_OK, EXIT_LINE_ERRORS):
            if code == EXIT_INTERRUPTED:
                print("The adapter run has not started; the same command resumes the base run, then runs it.",
                      file=sys.stderr, flush=True)
            return code
        comparison.update(base_run=base_name, base_pass_by_round=base["summary"]["pass_by_round"])
    code, results = _run_with_store(args, settings, store, problems, line_errors, time.perf_counter(),
                                    comparison=comparison)
    if base is None or code not in (EXIT_OK, EXIT_LINE_ERRORS):
        return code
    print(format_comparison(base["summary"], results["summary"]), flush=True)
    record_eval(store, name, base, role="base")
    record_eval(store, name, results, role="adapter")
    print(f"Both are recorded on the adapter's card: python -m execfeedback adapter show {name}", flush=True)
    return code


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.+" else "_" for c in name)
