"""Headless eval: the Solve loop over problems, scored on hidden tests, pass@1 per round; its figures and tables.

How a run works: each problem is one `eval` trace of the same loop the page uses, in a fresh kernel
namespace (kernels are reused across problems, one per `--concurrency` slot). Model code runs as the
user's own code, exactly as Jupyter runs it (it can delete files or fork); the eval kernels get a
memory limit and a CPU-time limit. Hidden tests that hang or kill the kernel fail that problem only.
A problem passes at round r when the attempt the loop chose at its latest round <= r passed the
hidden tests. Traces go to the store in `--data-dir`, tagged with the eval run and the problem id.
The same `--name` resumes an interrupted run: problems with a finished trace in it are not run again.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import signal
import statistics
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from kernels import KernelPool
from local_model import Engine, Sampling

from ..loop.loop import Loop, LoopConfig, Task
from ..traces import TraceStore, generated_tokens
from ..settings import SETTINGS
from .problems import Problem, task_message

OVERHEAD_TARGET_S = 0.020
FINISHED = ("passed", "failed")  # trace statuses that count as done; "stopped" and "running" run again
# Settings that change results: a resumed run must use the same ones. Concurrency and --limit do not.
RESULT_KEYS = ("problems", "model", "adapter", "backend", "base_url", "rounds", "candidates",
               "retry_candidates", "retry_fresh", "select_inputs", "retry", "repeat_resamples", "temperature", "seed", "max_tokens", "timeout", "n_ctx")


# -- accounting: pure functions over stored attempts -------------------------------------------------

def _score(a: dict) -> tuple:
    """How the loop ranks failed candidates of one round (see loop._better): ties keep the earlier one."""
    checks = a.get("checks") or {}
    return (a.get("code") is not None, a.get("exec_status") == "check_failed", checks.get("passed", 0))


def chosen_by_round(attempts: list[dict], final_attempt_id: int | None = None) -> dict[int, dict]:
    """The attempt the loop went on with at each round: the first that passed the visible checks, else the best."""
    rounds: dict[int, list[dict]] = {}
    for a in sorted(attempts, key=lambda a: (a["round"], a.get("candidate", 0), a.get("id") or 0)):
        rounds.setdefault(a["round"], []).append(a)
    chosen = {}
    for rnd, group in rounds.items():
        selected = [a for a in group if (a.get("selection") or {}).get("chosen")]
        if selected:  # several candidates: selection by execution said which one won
            chosen[rnd] = selected[0]
            continue
        passing = [a for a in group if a.get("passed")]
        if passing:
            chosen[rnd] = passing[0]
            continue
        best = group[0]
        for a in group[1:]:
            if _score(a) > _score(best):
                best = a
        chosen[rnd] = best
    final = next((a for a in attempts if final_attempt_id is not None and a.get("id") == final_attempt_id), None)
    if final is not None and final["round"] == max(rounds):
        chosen[final["round"]] = final  # the loop said which one it kept; trust it
    return chosen


def passed_by_round(attempts: list[dict], rounds: int, final_attempt_id: int | None = None) -> list[bool]:
    """Round r passes when the attempt chosen at the latest round <= r passed the hidden tests."""
    chosen = chosen_by_round(attempts, final_attempt_id) if attempts else {}
    out, current = [], None
    for r in range(rounds + 1):
        current = chosen.get(r, current)
        out.append(bool(current and current.get("hidden_passed")))
    return out


def error_type(attempt: dict | None) -> str:
    """What went wrong in an attempt, for the fix-rate table: the exception name, or the status."""
    if attempt is None:
        return "no_attempt"
    status = attempt.get("exec_status")
    if status == "error":
        return attempt.get("ename") or "error"
    if status == "ok":
        return "hidden_only"  # passed the visible tests, failed hidden ones: nothing was fed back
    return status or "unknown"


def account(problems: list[dict]) -> dict:
    """Summary figures from per-problem `passed_by_round` lists (and `round0_error` for failures at round 0).

    regressions counts pass -> fail between consecutive rounds, honestly: it is not assumed to be zero.
    """
    n = len(problems)
    width = max((len(p["passed_by_round"]) for p in problems), default=0)
    counts = []
    for r in range(width):
        counts.append(sum(1 for p in problems if p["passed_by_round"][min(r, len(p["passed_by_round"]) - 1)]))
    regressions = sum(1 for p in problems for a, b in zip(p["passed_by_round"], p["passed_by_round"][1:]) if a and not b)
    by_error: dict[str, dict] = {}
    for p in problems:
        pbr = p["passed_by_round"]
        if not pbr or pbr[0]:
            continue
        row = by_error.setdefault(p.get("round0_error") or "unknown", {"failed": 0, "fixed": 0})
        row["failed"] += 1
        row["fixed"] += int(bool(pbr[-1]))
    for row in by_error.values():
        row["rate"] = round(row["fixed"] / row["failed"], 4)
    failed0 = sum(r["failed"] for r in by_error.values())
    fixed = sum(r["fixed"] for r in by_error.values())
    # Cost: the mean tokens generated per problem up to and including each round, beside that round's pass@1.
    tokens_by_round = []
    for r in range(width):
        spent = [(p.get("tokens_by_round") or [0])[min(r, len(p.get("tokens_by_round") or [0]) - 1)] for p in problems]
        tokens_by_round.append(round(sum(spent) / n, 1) if n else 0.0)
    r0_failed = sum(p.get("round0_failed_attempts", 0) for p in problems)
    r0_static = sum(p.get("round0_static", 0) for p in problems)
    return {
        "n": n,
        "pass_by_round": [round(c / n, 4) if n else 0.0 for c in counts],
        "pass_counts_by_round": counts,
        "regressions": regressions,
        "fix_rate_by_error": dict(sorted(by_error.items(), key=lambda kv: (-kv[1]["failed"], kv[0]))),
        "fix_rate": round(fixed / failed0, 4) if failed0 else None,
        "tokens_per_problem_by_round": tokens_by_round,
        "tokens_per_problem": tokens_by_round[-1] if tokens_by_round else 0.0,
        "round0_failed_attempts": r0_failed,
        "round0_static_caught": r0_static,
    }


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def generation_figures(attempts: list[dict]) -> dict:
    """Tokens/s over all generations (tokens / decode time), time to first token, totals."""
    model = [a for a in attempts if a.get("author", "model") == "model"]
    tokens = sum(a.get("completion_tokens") or 0 for a in model)
    decode = sum(a.get("decode_s") or 0.0 for a in model)
    ttft = [a["ttft_s"] for a in model if a.get("ttft_s") is not None]
    prompt_eval = sum(a.get("prompt_eval_s") or 0.0 for a in model)
    return {
        "attempts": len(model),
        "completion_tokens": tokens,
        "tokens_per_s": round(tokens / decode, 2) if decode > 0 else None,
        "ttft_s": round(statistics.median(ttft), 4) if ttft else None,
        "ttft_p95_s": round(_quantile(ttft, 0.95), 4) if ttft else None,
        "generation_s": round(decode + prompt_eval, 3),
        "exec_s": round(sum(a.get("exec_s") or 0.0 for a in model), 3),
    }


def problem_result(problem_id: str, trace: dict, attempts: list[dict], rounds: int) -> dict:
    """One problem's line in the results file, from its stored trace and attempts."""
    chosen = chosen_by_round(attempts, trace.get("final_attempt_id")) if attempts else {}
    pbr = passed_by_round(attempts, rounds, trace.get("final_attempt_id"))
    final = chosen[max(chosen)] if chosen else None
    model = [a for a in attempts if a.get("author", "model") == "model"]
    per_round = Counter()
    for a in model:
        per_round[a["round"]] += generated_tokens(a)
    tokens_by_round, spent = [], 0
    for r in range(len(pbr)):
        spent += per_round.get(r, 0)
        tokens_by_round.append(spent)
    round0 = [a for a in model if a["round"] == 0 and not a.get("passed")]
    return {
        "id": problem_id,
        "passed_by_round": pbr,
        "passed": pbr[-1],
        "status": trace.get("status"),
        "stop_reason": trace.get("stop_reason"),
        "rounds_used": trace.get("rounds", 0),
        "n_attempts": len(attempts),
        "tokens": spent,
        "tokens_by_round": tokens_by_round,  # generated up to and including each round
        "round0_failed_attempts": len(round0),
        "round0_static": sum(1 for a in round0 if a.get("static")),  # failed before running, nothing run
        "round0_error": None if pbr[0] else error_type(chosen.get(0)),
        "final_exec_status": final.get("exec_status") if final else None,
        "trace_id": trace["id"],
        "attempts": [{k: a.get(k) for k in ("id", "round", "candidate", "exec_status", "ename", "passed",
                                             "completion_tokens", "ttft_s", "tokens_per_s", "exec_s", "static",
                                             "selection")}
                     | {"hidden_passed": None if a.get("hidden_passed") is None else bool(a["hidden_passed"])}
                     for a in attempts],
    }


# -- settings and the run name ----------------------------------------------------------------------

@dataclass
class EvalSettings:
    problems: str
    model: str = "default"
    adapter: str | None = None
    backend: str | None = None
    base_url: str | None = None
    rounds: int = SETTINGS["rounds"].default
    candidates: int = SETTINGS["candidates"].default
    retry_candidates: int = SETTINGS["retry_candidates"].default
    retry_fresh: int = SETTINGS["retry_fresh"].default
    select_inputs: int = SETTINGS["select_inputs"].default
    retry: str = SETTINGS["retry"].default
    repeat_resamples: int = SETTINGS["repeat_resamples"].default
    temperature: float = SETTINGS["temperature"].default
    seed: int = SETTINGS["seed"].default
    max_tokens: int = SETTINGS["max_tokens"].default
    timeout: float = 10.0
    n_ctx: int = 4096
    concurrency: int = 1
    limit: int | None = None
    memory_mb: int = 2048
    cpu_seconds: int = 600

    def result_config(self) -> dict:
        return {k: getattr(self, k) for k in RESULT_KEYS}

    def loop_config(self) -> LoopConfig:
        return LoopConfig(rounds=self.rounds, candidates=self.candidates, retry_candidates=self.retry_candidates,
                          retry_fresh=self.retry_fresh, select_inputs=self.select_inputs, retry=self.retry,
                          repeat_resamples=self.repeat_resamples, exec_timeout=self.timeout,
                          fresh_namespace=True,
                          sampling=Sampling(temperature=self.temperature, seed=self.seed,
                                            max_tokens=self.max_tokens)).validate()

    def default_name(self) -> str:
        """Problems file, model and the settings that change results, plus a hash of all of them."""
        model = Path(self.model).stem if self.model.endswith(".gguf") else self.model.replace("/", "_")
        digest = hashlib.sha256(json.dumps(self.result_config(), sort_keys=True).encode()).hexdigest()[:6]
        if self.adapter:
            model += f"+{self.adapter}"
        return (f"{Path(self.problems).stem}-{model}-r{self.rounds}-k{self.candidates}x{self.retry_candidates}-{self.retry}"
                f"-t{self.temperature:g}-s{self.seed}-n{self.max_tokens}-{digest}")


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# -- the runner -------------------------------------------------------------------------------------

class EvalRunner:
    """Runs problems through the loop, `concurrency` at a time, one kernel per slot; Ctrl-C stops cleanly."""

    def __init__(self, engine: Engine, traces: TraceStore, settings: EvalSettings, run_id: int, *,
                 progress: bool = True, log=None):
        self.engine = engine
        self.traces = traces
        self.settings = settings
        self.config = settings.loop_config()
        self.run_id = run_id
        self.progress = progress
        self.log = log or (lambda text: print(text, file=sys.stderr, flush=True))
        self.results: dict[str, dict] = {}
        self.overheads: list[dict] = []
        self.interrupted = False
        self.model_failed = False
        self._model_error_streak = 0
        self._loops: set[Loop] = set()
        self._sigints = 0
        self._main: asyncio.Task | None = None
        self._stopping: set[asyncio.Task] = set()

    async def run(self, problems: list[Problem], *, source: str, done: int = 0, total: int | None = None) -> None:
        from tqdm import tqdm

        s = self.settings
        pool = KernelPool(spare=True, default_timeout=s.timeout,
                          resource_limits={"memory_bytes": s.memory_mb * 2 ** 20, "cpu_seconds": s.cpu_seconds})
        queue: asyncio.Queue[Problem] = asyncio.Queue()
        for p in problems:
            queue.put_nowait(p)
        loop = asyncio.get_running_loop()
        self._main = asyncio.current_task()
        bar = tqdm(total=total or len(problems), initial=done, unit="problem", disable=not self.progress,
                   dynamic_ncols=True, mininterval=1.0)
        if self.progress:
            self.log = lambda text: bar.write(text, file=sys.stderr)
        handled = True
        try:
            loop.add_signal_handler(signal.SIGINT, self._on_sigint)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or no signals here
            handled = False
        try:
            await pool.start()
            workers = [asyncio.create_task(self._worker(f"eval-{i}", pool, queue, source, bar))
                       for i in range(min(s.concurrency, len(problems)) or 1)]
            await asyncio.gather(*workers)
        except asyncio.CancelledError:  # a second Ctrl-C: gather has cancelled the workers mid-problem
            self.interrupted = True
        finally:
            if handled:
                loop.remove_signal_handler(signal.SIGINT)
            bar.close()
            self._close_dangling(status="stopped", stop_reason="stopped")
            await pool.shutdown_all()

    def _on_sigint(self) -> None:
        self._sigints += 1
        self.interrupted = True
        if self._sigints == 1:
            self.log("Stopping: the problems in flight end now and are run again on resume "
                     "(press Ctrl-C again to quit at once).")
            self._stop_all()
        elif self._main is not None:
            self._main.cancel()

    def _stop_all(self) -> None:
        """Cancel the generations and interrupt the code in flight; each loop then closes its trace as stopped."""
        for lp in list(self._loops):
            task = asyncio.ensure_future(lp.stop())
            self._stopping.add(task)
            task.add_done_callback(self._stopping.discard)

    async def _worker(self, key: str, pool: KernelPool, queue: asyncio.Queue, source: str, bar) -> None:
        lp = Loop(self.engine, pool, self.traces, self.config)
        self._loops.add(lp)
        try:
            while not self.interrupted:
                try:
                    problem = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                await self._recycle_if_spent(pool, key)
                result = await self._one(lp, key, problem, source)
                if result is None:
                    return
                if not result:
                    continue  # no result to count (the model did not answer)
                self.results[problem.id] = result
                bar.update(1)
                bar.set_postfix(passed=sum(r["passed"] for r in self.results.values()), refresh=False)
                self.log(_problem_line(result))
        finally:
            self._loops.discard(lp)

    async def _one(self, lp: Loop, key: str, problem: Problem, source: str) -> dict | None:
        """The problem's result; None when the run was stopped, {} when the model never answered."""
        task = Task(kind="eval", messages=[{"role": "user", "content": task_message(problem)}], kernel_key=key,
                    checks=problem.visible_tests if problem.visible_tests.strip() else None,
                    hidden_tests=problem.hidden_tests if problem.hidden_tests.strip() else None,
                    cache_key=key, task_id=problem.id, task_source=source, eval_run_id=self.run_id)

        def on_event(ev: dict) -> None:
            if ev["type"] == "attempt" and ev["attempt"].get("loop_overhead_s") is not None:
                self.overheads.append({"round": ev["attempt"]["round"], "s": ev["attempt"]["loop_overhead_s"]})

        try:
            res = await lp.run_to_end(task, on_event=on_event)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - one broken problem must not end the run
            self.log(f"{problem.id}: the runner failed on this problem ({type(e).__name__}: {e}); "
                     "it counts as failed and runs again on resume")
            tid = self._close_dangling(status="failed", stop_reason="error", task_id=problem.id)
            return {**problem_result(problem.id, {"id": tid, "status": "failed", "stop_reason": "error"}, [],
                                     self.settings.rounds), "error": f"{type(e).__name__}: {e}"}
        if res.stop_reason == "stopped":
            return None  # interrupted: the trace is kept as stopped and the problem runs again on resume
        if res.attempts and all(a.record.get("finish_reason") == "error" for a in res.attempts):
            # The model never answered (a server down, a broken model): not a result; it runs again on resume.
            self.traces.finish_trace(res.trace_id, status="failed", stop_reason="error")
            self._model_error_streak += 1
            self.log(f"{problem.id}: the model answered no attempt (finish_reason 'error'); not counted")
            if self._model_error_streak >= 2 and not self.model_failed:
                self.model_failed = self.interrupted = True
                self._stop_all()
            return {}
        self._model_error_streak = 0
        trace = self.traces.get_trace(res.trace_id, with_inputs=False)
        return problem_result(problem.id, trace, trace["attempts"], self.settings.rounds)

    async def _recycle_if_spent(self, pool: KernelPool, key: str) -> None:
        """A kernel's CPU limit counts its whole life: replace it between problems once half is used."""
        pid = pool.info(key)["pid"]
        if not pid:
            return
        try:
            import psutil

            t = psutil.Process(pid).cpu_times()
            used = t.user + t.system
        except Exception:  # noqa: BLE001 - gone already, or no psutil: the pool replaces dead kernels anyway
            return
        if used > self.settings.cpu_seconds / 2:
            await pool.restart(key)

    def _close_dangling(self, *, status: str, stop_reason: str, task_id: str | None = None) -> int | None:
        """Traces of this run left 'running' (a crash, Ctrl-C) are closed so they are never taken as results."""
        where, params = "eval_run_id = ? AND status = 'running'", [self.run_id]
        if task_id is not None:
            where += " AND task_id = ?"
            params.append(task_id)
        rows = self.traces.store.query(f"SELECT id FROM traces WHERE {where}", tuple(params))
        for r in rows:
            self.traces.finish_trace(r["id"], status=status, stop_reason=stop_reason)
        return rows[-1]["id"] if rows else None


def finished_traces(traces: TraceStore, run_id: int) -> dict[str, dict]:
    """The latest finished trace of each problem in an eval run (resume reuses these)."""
    rows = traces.store.query("SELECT * FROM traces WHERE eval_run_id = ? AND kind = 'eval' AND status IN (?, ?) "
                              "AND coalesce(stop_reason, '') != 'error' ORDER BY id", (run_id, *FINISHED))
    return {r["task_id"]: r for r in rows}


def _problem_line(r: dict) -> str:
    marks = "".join("+" if p else "-" for p in r["passed_by_round"])
    why = f", round 0: {r['round0_error']}" if r.get("round0_error") else ""
    return f"{r['id']}: {marks} ({r['stop_reason']}, {r['n_attempts']} attempt(s){why})"


# -- output ---------------------------------------------------------------------------------------

def summarize(results: list[dict], attempts: list[dict], overheads: list[dict], *, wall_s: float) -> dict:
    summary = account(results)
    summary.update(generation_figures(attempts))
    summary["wall_s"] = round(wall_s, 2)
    values = [o["s"] for o in overheads]
    by_round: dict[int, list[float]] = {}
    for o in overheads:
        by_round.setdefault(o["round"], []).append(o["s"])
    summary["loop_overhead_s"] = {
        "median": round(statistics.median(values), 5) if values else None,
        "p95": round(_quantile(values, 0.95), 5) if values else None,
        "n": len(values),
        "median_by_round": {str(r): round(statistics.median(v), 5) for r, v in sorted(by_round.items())},
        "target": OVERHEAD_TARGET_S,
    }
    summary["stop_reasons"] = dict(Counter(r["stop_reason"] for r in results))
    return summary


def format_table(results: dict) -> str:
    s = results["summary"]
    n = s["n"]
    cfg = s.get("config", {})
    lines = [f"Eval {s.get('run_name')}: {n} problem(s), model {s.get('model')} ({(s.get('manifest') or {}).get('backend')}),"
             f" rounds {cfg.get('rounds')}, candidates {cfg.get('candidates')} then {cfg.get('retry_candidates', 1)}"
             f" after a failure, model-written inputs {cfg.get('select_inputs', 0)}, retry {cfg.get('retry')},"
             f" repeat resamples {cfg.get('repeat_resamples', 0)}"]
    if not s.get("complete", True):
        lines.append(f"INTERRUPTED: {s.get('n_pending')} problem(s) not run yet; run the same command again to resume.")
    lines.append("round  pass@1 (hidden tests)   tokens generated per problem, up to this round"
                 if n else "no problem finished in this run")
    costs = s.get("tokens_per_problem_by_round") or []
    for r, (frac, cnt) in enumerate(zip(s["pass_by_round"], s["pass_counts_by_round"])):
        cost = f"   {costs[r]:>8.1f}" if r < len(costs) else ""
        lines.append(f"{r:>5}  {cnt:>3}/{n:<3} {100 * frac:5.1f}%{cost}")
    if s.get("round0_failed_attempts"):
        lines.append(f"static analysis: {s.get('round0_static_caught', 0)} of {s['round0_failed_attempts']} failed "
                     "round-0 attempt(s) caught before running")
    lines.append(f"regressions (pass -> fail between rounds): {s['regressions']}")
    if s["fix_rate_by_error"]:
        lines.append("fix rate by round-0 error (fixed / failed at round 0):")
        for name, row in s["fix_rate_by_error"].items():
            note = "  (passed the visible tests, failed hidden ones)" if name == "hidden_only" else ""
            lines.append(f"  {name:<20} {row['fixed']:>3}/{row['failed']:<3} {100 * row['rate']:5.1f}%{note}")
    else:
        lines.append("fix rate by round-0 error: nothing failed at round 0")
    num = lambda v, fmt: "-" if v is None else format(v, fmt)
    lines.append(f"tokens/s {num(s.get('tokens_per_s'), '.1f')}   TTFT median {num(s.get('ttft_s'), '.2f')} s "
                 f"(p95 {num(s.get('ttft_p95_s'), '.2f')} s)   completion tokens {s.get('completion_tokens')}")
    lines.append(f"wall {s['wall_s']} s (this run)   generation {s.get('generation_s')} s   execution {s.get('exec_s')} s"
                 + (f"   resumed {s['n_resumed']} problem(s)" if s.get("n_resumed") else ""))
    o = s.get("loop_overhead_s") or {}
    if o.get("n"):
        lines.append(f"loop overhead per round: median {1000 * o['median']:.1f} ms, p95 {1000 * o['p95']:.1f} ms "
                     f"over {o['n']} attempt(s) (target < {1000 * OVERHEAD_TARGET_S:.0f} ms)")
    return "\n".join(lines)


def format_comparison(base: dict, adapter: dict) -> str:
    """pass@1 per round of the base run and the adapter run, side by side, with the change in points."""
    n = adapter["n"]
    lines = [f"Base vs adapter on the same {n} problem(s) (runs {base['run_name']!r} and {adapter['run_name']!r}):",
             "round  base              adapter           change"]
    cell = lambda s, r: f"{s['pass_counts_by_round'][r]:>3}/{s['n']:<3} {100 * s['pass_by_round'][r]:5.1f}%"
    for r in range(min(len(base["pass_by_round"]), len(adapter["pass_by_round"]))):
        change = 100 * (adapter["pass_by_round"][r] - base["pass_by_round"][r])
        lines.append(f"{r:>5}  {cell(base, r):<16}  {cell(adapter, r):<16}  {change:+.1f} pts")
    lines.append(f"regressions (pass -> fail between rounds): base {base['regressions']}, "
                 f"adapter {adapter['regressions']}")
    return "\n".join(lines)
