"""The execution-feedback loop: propose code, run it, check it, feed the failure back; every attempt is kept.

One code path serves the page (Solve, Fix), the API and the headless eval runner. Like claudette's
tool loop it is a small async generator with a round budget (`rounds`) and a stop function.
"""

from __future__ import annotations

import ast
import json
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any, AsyncIterator, Callable

from dialog.render import strip_ansi
from kernels import KernelPool
from local_model import Engine, ModelError, Sampling

from .checks import instrument, instrument_candidate, parse_check_output, parse_locals_output
from .extract import extract_code
from .feedback import FeedbackConfig, error_signature, failure_summary, feedback_message, syntax_error_obs
from .inputs import MAX_TOKENS as INPUTS_MAX_TOKENS, defined_functions, inputs_prompt, parse_inputs
from .select import MARGIN, Candidate, check_calls, choose, drop_timeouts, parse_probe, probe_source, shared_inputs
from .static import certain_failures, observation
from ..traces import TraceStore
from ..settings import LOOP, SETTINGS, keys

RETRY_MODES = SETTINGS["retry"].choices
RESET_NAMESPACE = "get_ipython().run_line_magic('reset', '-f')"


@dataclass
class LoopConfig:
    """The loop's settings; those of the settings table (execfeedback/settings.py) take their defaults and ranges
    from it. retry: refine (the conversation grows: code, feedback, code...), repair (one fresh user turn with the
    task, the failed code and the feedback: small models copy their last answer less this way), regenerate (one fresh
    user turn with the task and what went wrong, the failed code left out) or resample (the round-0 prompt again,
    sampled warmer). repeat_resamples: greedy small models often copy their failed answer,
    which would end the loop as "no progress"."""

    rounds: int = SETTINGS["rounds"].default
    candidates: int = SETTINGS["candidates"].default
    retry_candidates: int = SETTINGS["retry_candidates"].default
    retry_fresh: int = SETTINGS["retry_fresh"].default
    select_inputs: int = SETTINGS["select_inputs"].default
    candidate_temperature: float = 0.8  # used when candidates > 1 (sampling several at 0 gives one answer)
    retry: str = SETTINGS["retry"].default
    repeat_resamples: int = SETTINGS["repeat_resamples"].default
    exec_timeout: float = SETTINGS["exec_timeout"].default
    fresh_namespace: bool = False      # eval: each attempt runs in a clean namespace
    static_check: bool = True          # certain failures (pyflakes) are fed back without running
    select_margin: int = MARGIN        # candidates > 1: outnumber greedy's group by this many to replace it
    sampling: Sampling = field(default_factory=lambda: Sampling(max_tokens=1024))
    feedback: FeedbackConfig = field(default_factory=FeedbackConfig)

    def count(self, rnd: int) -> int:
        """How many candidates round `rnd` samples: `candidates` in round 0, `retry_candidates` after a failure."""
        return self.candidates if rnd == 0 else self.retry_candidates

    def fresh(self, rnd: int, n: int) -> int:
        """How many of round `rnd`'s n candidates sample the round-0 prompt afresh: never candidate 0 (the greedy
        answer to the feedback), and none in round 0 or when every retry is a resample already."""
        return 0 if rnd == 0 or self.retry == "resample" else min(self.retry_fresh, n - 1)

    def validate(self) -> "LoopConfig":
        for key in keys(LOOP):
            if problem := SETTINGS[key].problem(getattr(self, key)):
                raise ValueError(problem)
        return self

    def as_dict(self) -> dict:
        return {"rounds": self.rounds, "candidates": self.candidates, "retry_candidates": self.retry_candidates,
                "retry_fresh": self.retry_fresh, "select_inputs": self.select_inputs,
                "candidate_temperature": self.candidate_temperature,
                "retry": self.retry, "repeat_resamples": self.repeat_resamples, "exec_timeout": self.exec_timeout,
                "fresh_namespace": self.fresh_namespace, "static_check": self.static_check,
                "select_margin": self.select_margin,
                "feedback": self.feedback.to_dict()}


@dataclass
class Task:
    """What one trace works on: the round-0 model input, where code runs, and how it is checked."""

    kind: str                          # solve, fix, eval
    messages: list[dict]               # round-0 model input
    kernel_key: str
    checks: str | None = None          # visible tests: shown to the model, run for feedback
    hidden_tests: str | None = None    # eval only: scored, never shown
    cache_key: str | None = None
    dialog_id: int | None = None
    message_id: int | None = None
    task_id: str | None = None
    task_source: str | None = None
    eval_run_id: int | None = None
    human_attempt: dict | None = None  # fix: {"code", "obs"} of the human's failing cell


@dataclass
class Attempt:
    round: int
    candidate: int
    completion: str
    code: str | None
    obs: dict
    passed: bool
    outputs: list[dict]
    record: dict
    id: int | None = None


@dataclass
class LoopResult:
    trace_id: int
    status: str                         # passed, failed, stopped
    stop_reason: str
    rounds: int
    attempts: list[Attempt]
    final: Attempt | None


def _clean_outputs(outputs: list[dict]) -> list[dict]:
    """The candidate's outputs as the user should see them: our marker lines removed."""
    out = []
    for o in outputs:
        if o.get("output_type") == "stream":
            text = o.get("text", "")
            _, text = parse_check_output(text)
            _, text = parse_locals_output(text)
            if text:
                out.append({**o, "text": text})
        else:
            out.append(o)
    return out


def _better(a: Attempt | None, b: Attempt) -> Attempt:
    """Between two failed candidates, the one to give feedback on: more checks passed, code over no code."""
    if a is None:
        return b
    def score(x: Attempt) -> tuple:
        checks = x.obs.get("checks") or {}
        return (x.code is not None, x.obs.get("status") == "check_failed", checks.get("passed", 0))
    return b if score(b) > score(a) else a


def same_code(a: str | None, b: str | None) -> bool:
    """Equal up to trailing whitespace and blank lines: what a copied answer looks like."""
    if a is None or b is None:
        return False
    norm = lambda c: "\n".join(line.rstrip() for line in c.strip().splitlines() if line.strip())
    return norm(a) == norm(b)


def repair_messages(messages: list[dict], code: str | None, feedback: str) -> list[dict]:
    """The round-0 input with its last user turn extended by the failed code and the feedback."""
    shown = f"This code was written for the task above and it failed:\n```python\n{code}\n```\n\n" if code else ""
    last = messages[-1] if messages else {}
    if last.get("role") == "user" and isinstance(last.get("content"), str):
        return messages[:-1] + [{"role": "user", "content": f"{last['content']}\n\n{shown}{feedback}"}]
    return messages + [{"role": "user", "content": f"{shown}{feedback}"}]


def regenerate_messages(messages: list[dict], summary: str) -> list[dict]:
    """The round-0 input with its last user turn extended by what went wrong, the failed code left out."""
    ask = (f"An earlier answer to this task failed. What went wrong:\n{summary}\n\nWrite a new solution from the "
           "task, not a patch of that answer. Return the whole code in one ```python block.")
    last = messages[-1] if messages else {}
    if last.get("role") == "user" and isinstance(last.get("content"), str):
        return messages[:-1] + [{"role": "user", "content": f"{last['content']}\n\n{ask}"}]
    return messages + [{"role": "user", "content": ask}]


class Loop:
    """Runs Tasks against one engine and one kernel pool, writing every attempt to the trace store."""

    def __init__(self, engine: Engine, pool: KernelPool, traces: TraceStore, config: LoopConfig | None = None):
        self.engine = engine
        self.pool = pool
        self.traces = traces
        self.config = (config or LoopConfig()).validate()
        self._stopped = False
        self._request_id: str | None = None
        self._running_key: str | None = None
        self.on_batch = None  # kernels' on_batch: each candidate's outputs, live, as its code runs (the page's)
        self._written: dict | None = None  # this trace's model-written inputs, asked for once

    async def stop(self) -> None:
        """The user's Stop: cancel the generation in flight and interrupt the code in flight."""
        self._stopped = True
        if self._request_id:
            self.engine.cancel(self._request_id)
        if self._running_key:
            await self.pool.interrupt(self._running_key)

    async def run(self, task: Task, should_stop: Callable[[], bool] | None = None) -> AsyncIterator[dict]:
        """Events: attempt_start, token, attempt (with the stored record), done (with the LoopResult); with
        candidates > 1 also note (fewer candidates than asked fit the context) and selected (groups, winner, why)."""
        cfg = self.config
        manifest = dict(self.engine.manifest)
        trace_id = self.traces.start_trace(
            task.kind, dialog_id=task.dialog_id, message_id=task.message_id, task_id=task.task_id,
            task_source=task.task_source, eval_run_id=task.eval_run_id, model=manifest.get("model"),
            backend=manifest.get("backend"), manifest=manifest, sampling=cfg.sampling.as_dict(), config=cfg.as_dict())
        stopped = lambda: self._stopped or bool(should_stop and should_stop())
        self._written = None
        attempts: list[Attempt] = []
        messages = list(task.messages)
        first_round = 0
        prev_sig: str | None = None
        no_code_streak = 0
        stop_reason = "budget"
        final: Attempt | None = None

        if task.human_attempt:
            human = await self._human_attempt(task, trace_id)
            attempts.append(human)
            yield {"type": "attempt", "attempt": human.record}
            messages = self._with_fix_request(messages, human)
            prev_sig = error_signature(human.obs)
            first_round = 1

        for rnd in range(first_round, first_round + cfg.rounds + 1):
            best: Attempt | None = None
            k, resamples, n = 0, 0, cfg.count(rnd)
            if n > 1 and not stopped():
                batch: list[Attempt] = []
                async for ev in self._batch_round(task, trace_id, messages, rnd, n, manifest):
                    if ev["type"] == "attempt":
                        batch.append(ev["attempt"])
                        attempts.append(ev["attempt"])
                        yield {"type": "attempt", "attempt": ev["attempt"].record}
                    elif ev["type"] == "selected":
                        best = ev["attempt"]
                        yield {"type": "selected", "round": rnd, "selection": ev["selection"]}
                    else:
                        yield ev
                for a in batch:
                    if best is None or not best.passed:
                        best = _better(best, a) if not a.passed else a
                k = n
                if (rnd > 0 and cfg.repeat_resamples and batch and not (best and best.passed)
                        and all(any(same_code(b.code, a.code) for a in attempts if a.round < rnd) for b in batch)):
                    resamples = 1
                if not batch:
                    k = n + resamples  # stopped or no candidates: nothing more this round
            while k < n + resamples:
                if stopped():
                    break
                yield {"type": "attempt_start", "round": rnd, "candidate": k}
                attempt = None
                if best is not None and best.passed:
                    break
                async for ev in self._attempt(task, trace_id, messages, rnd, k, manifest, warm=k >= n):
                    if ev["type"] == "token":
                        yield ev
                    else:
                        attempt = ev["attempt"]
                if attempt is None:
                    break
                attempts.append(attempt)
                yield {"type": "attempt", "attempt": attempt.record}
                if attempt.passed:
                    best = attempt
                    break
                best = _better(best, attempt)
                k += 1
                if (rnd > 0 and resamples < cfg.repeat_resamples and k == n + resamples
                        and any(same_code(attempt.code, a.code) for a in attempts[:-1])):
                    resamples += 1
            if best is None or stopped():
                stop_reason = "stopped"
                final = best or final
                break
            final = best
            if best.passed:
                stop_reason = "passed"
                break
            if rnd == first_round + cfg.rounds:
                stop_reason = "budget"
                break
            sig = error_signature(best.obs)
            no_code_streak = no_code_streak + 1 if best.code is None else 0
            if no_code_streak >= 2:
                stop_reason = "no_code"
                break
            if sig == prev_sig and best.code is not None:
                stop_reason = "no_progress"
                break
            prev_sig = sig
            if cfg.retry == "resample":
                messages = list(task.messages)
            elif cfg.retry == "repair":
                messages = repair_messages(task.messages, best.code, best.record["feedback"])
            elif cfg.retry == "regenerate":
                summary = failure_summary(best.obs, best.code, cfg.feedback, keep=task.checks)
                messages = regenerate_messages(task.messages, summary)
            else:
                messages = messages + [{"role": "assistant", "content": best.completion},
                                       {"role": "user", "content": best.record["feedback"]}]

        status = "passed" if stop_reason == "passed" else ("stopped" if stop_reason == "stopped" else "failed")
        hidden = final.record.get("hidden_passed") if final else None
        self.traces.finish_trace(trace_id, status=status, stop_reason=stop_reason,
                                 final_attempt_id=final.id if final else None, hidden_passed=hidden)
        result = LoopResult(trace_id, status, stop_reason, max((a.round for a in attempts), default=0), attempts, final)
        yield {"type": "done", "result": result}

    async def run_to_end(self, task: Task, on_event: Callable[[dict], Any] | None = None) -> LoopResult:
        result = None
        async for ev in self.run(task):
            if on_event:
                on_event(ev)
            if ev["type"] == "done":
                result = ev["result"]
        return result

    # -- one attempt -----------------------------------------------------------------------------

    async def _attempt(self, task: Task, trace_id: int, messages: list[dict], rnd: int, k: int,
                       manifest: dict, warm: bool = False) -> AsyncIterator[dict]:
        sampling = self.sampling_for(rnd, k, warm)
        self._request_id = rid = uuid.uuid4().hex
        text, figures, finish = "", {}, None
        try:
            async for ev in self.engine.stream(messages, sampling, cache_key=task.cache_key, request_id=rid):
                if ev["type"] == "token":
                    yield ev
                elif ev["type"] == "done":
                    text, figures, finish = ev.get("text") or "", ev.get("figures") or {}, ev.get("finish_reason")
        except ModelError as e:
            text, finish = "", "error"
            figures = {"error": str(e)}
        finally:
            self._request_id = None
        if finish == "cancelled" or (self._stopped and finish != "stop"):
            return
        attempt = await self._evaluate(task, trace_id, messages, rnd, k, text, figures, finish, manifest, sampling)
        yield {"type": "attempt", "attempt": attempt}

    def sampling_for(self, rnd: int, k: int, warm: bool = False) -> Sampling:
        """Candidate k's sampling: candidate 0 greedy (the configured sampling; warm in a resample round or as an
        extra resample), the others warm, each with its own seed."""
        cfg = self.config
        s = cfg.sampling
        if warm or k > 0 or (cfg.retry == "resample" and rnd > 0):
            s = replace(s, temperature=max(s.temperature, cfg.candidate_temperature), seed=s.seed + 1000 * rnd + k)
        return s

    async def _batch_round(self, task: Task, trace_id: int, messages: list[dict], rnd: int, n: int,
                           manifest: dict) -> AsyncIterator[dict]:
        """k candidates from one batched request, streamed (candidate 0's tokens go to the page), then each run
        and checked, then selection by execution. With `retry_fresh`, the round's last candidates read the
        round-0 prompt in the same batch. Events: token, note, attempt_start, attempt, selected."""
        fresh = self.config.fresh(rnd, n)
        samplings = [self.sampling_for(rnd, k) for k in range(n)]
        inputs = [messages] * (n - fresh) + [list(task.messages)] * fresh
        own = [None] * (n - fresh) + inputs[n - fresh:] if fresh else None
        self._request_id = rid = uuid.uuid4().hex
        done: dict[int, tuple[str, dict, str | None]] = {}
        note = None
        try:
            async for ev in self.engine.stream(messages, samplings=samplings, cache_key=task.cache_key,
                                               request_id=rid, seq_messages=own):
                seq = ev.get("seq", 0)
                if ev["type"] == "token" and seq == 0:
                    yield {**ev, "candidate": 0}
                elif ev["type"] == "note":
                    note = ev.get("text")
                    yield {"type": "note", "round": rnd, "text": note}
                elif ev["type"] == "done":
                    figures = dict(ev.get("figures") or {})
                    if ev.get("error"):  # a sequence that could not be served says why in its record
                        figures["error"] = ev["error"]
                    done[seq] = (ev.get("text") or "", figures, ev.get("finish_reason"))
        except ModelError as e:
            done = {k: ("", {"error": str(e)}, "error") for k in range(len(samplings))}
        finally:
            self._request_id = None
        if self._stopped or any(f == "cancelled" for _, _, f in done.values()):
            return
        batch: list[Attempt] = []
        for k in sorted(done):
            text, figures, finish = done[k]
            if note and finish == "error" and not text and k > 0:
                continue  # dropped to fit the context: the note says so
            if self._stopped:
                return
            yield {"type": "attempt_start", "round": rnd, "candidate": k}
            attempt = await self._evaluate(task, trace_id, inputs[k], rnd, k, text, figures, finish, manifest,
                                           samplings[k])
            if k >= n - fresh:
                attempt.record["fresh"] = True
            if note:
                attempt.record["note"] = note
            batch.append(attempt)
            yield {"type": "attempt", "attempt": attempt}
        if not batch or self._stopped:
            return
        winner, selection = await self._select(task, batch, note)
        yield {"type": "selected", "attempt": winner, "selection": selection}

    async def _select(self, task: Task, batch: list[Attempt], note: str | None) -> tuple[Attempt | None, dict]:
        """Selection by execution over a round's candidates; every candidate's record gets its group and the
        reason the winner won. The kernel is left holding the winner's definitions."""
        cfg = self.config
        written = await self._written_inputs(task, [a for a in batch if a.passed])
        inputs = shared_inputs(task.checks, written["calls"])
        cands = []
        for a in batch:
            why = "" if a.passed else (f"static {a.obs.get('ename')}" if a.obs.get("static")
                                       else a.obs.get("status", ""))
            cands.append(Candidate(a.candidate, a.passed, None, why))
        results: dict[int, list] = {}
        for c, a in zip(cands, batch):
            if not c.survived:
                continue
            if not inputs:  # no shared inputs: agreement on what each printed and showed
                c.signature = json.dumps([(o.get("text") or (o.get("data") or {}).get("text/plain"))
                                          for o in a.outputs], sort_keys=True)
                continue
            self._running_key = task.kernel_key
            try:
                res = await self.pool.execute(task.kernel_key, probe_source(a.code, inputs),
                                              timeout=cfg.exec_timeout, store_history=False)
            finally:
                self._running_key = None
            found = parse_probe(res.stdout) if res.status == "ok" else None
            if found is None or isinstance(found, dict):
                c.signature, c.why = None, f"probe {res.status}" + (f" {found['error']}" if found else "")
            else:
                c.signature = json.dumps(found)
                results[c.k] = found
        drop_timeouts(cands, results, inputs)
        sel = choose(cands, cfg.select_margin)
        winner = next((a for a in batch if a.candidate == sel.winner), None)
        for c, a in zip(cands, batch):
            record = sel.record_for(c, inputs)
            # the inputs' generation is counted once, on the round's first candidate
            record.update(written_inputs=len(written["calls"]), inputs_why=written["why"],
                          fresh=bool(a.record.get("fresh")),
                          inputs_tokens=written.get("new_tokens", 0) if c is cands[0] else 0)
            if note:
                record["note"] = note
            a.record["selection"] = record
            if a.id is not None:
                self.traces.set_selection(a.id, record)
        if winner is not None and winner is not batch[-1] and not cfg.fresh_namespace:
            # the last candidate run defined its names in the kernel: the winner's must be the ones left there
            await self.pool.execute(task.kernel_key, instrument_candidate(winner.code), timeout=cfg.exec_timeout,
                                    store_history=False)
        return winner, {"winner": sel.winner, "groups": sel.groups, "reason": sel.reason, "inputs": inputs,
                        "written_inputs": len(written["calls"]), "inputs_why": written["why"], "note": note}

    def inputs_sampling(self) -> Sampling:
        """The sampling of the model-written inputs: greedy, short."""
        return replace(self.config.sampling, temperature=0.0, max_tokens=INPUTS_MAX_TOKENS)

    async def _written_inputs(self, task: Task, survivors: list[Attempt]) -> dict:
        """Calls of the task's function the model writes (inputs only), asked for once per trace and only when two
        or more survivors define a function to tell apart: {"calls", "why", "new_tokens" (this time's cost)}."""
        n = self.config.select_inputs
        if self._written is not None:
            return self._written
        if not n or len(survivors) < 2:
            return {"calls": [], "why": "off" if not n else "fewer than 2 survivors"}
        names = defined_functions(survivors[0].code)
        called = [c[0] for c in check_calls(task.checks)]
        name = next((f for f in called if f in names), names[0] if names else None)
        if name is None:
            return {"calls": [], "why": "no function defined"}
        self._request_id = rid = uuid.uuid4().hex
        text, tokens, why = "", 0, ""
        try:
            async for ev in self.engine.stream(inputs_prompt(task.messages, survivors[0].code, name, n),
                                               self.inputs_sampling(), request_id=rid):
                if ev["type"] == "done":
                    text = ev.get("text") or ""
                    tokens = (ev.get("figures") or {}).get("completion_tokens") or 0
                    why = f"model error: {ev['error']}" if ev.get("error") else ""
        except ModelError as e:
            why = f"model error: {e}"
        finally:
            self._request_id = None
        calls = parse_inputs(text, [name], n)
        why = why or (f"{len(calls)} calls of {name} written" if calls else f"no calls of {name} in the reply")
        self._written = {"calls": calls, "why": why}
        return {"calls": calls, "why": why, "new_tokens": tokens}

    async def _evaluate(self, task: Task, trace_id: int, messages: list[dict], rnd: int, k: int, text: str,
                        figures: dict, finish: str | None, manifest: dict, sampling: Sampling) -> Attempt:
        """Extract, check statically, run and check one candidate; store it as an attempt."""
        t0 = time.perf_counter()
        extraction = extract_code(text)
        if not extraction.ok or not extraction.code:
            obs = {"status": "no_code"}
            outputs: list[dict] = []
            exec_s = 0.0
        else:
            obs, outputs, exec_s = await self._execute(task, extraction.code)
        if finish == "length":
            obs.update(cut_off=True, max_tokens=sampling.max_tokens)
        passed = obs["status"] == "ok"
        hidden = None
        hidden_s = 0.0  # scoring runs code too: it is execution, not loop overhead
        if task.hidden_tests and extraction.code and obs["status"] in ("ok", "check_failed"):
            t_hidden = time.perf_counter()
            hidden = await self._score_hidden(task, extraction.code)
            hidden_s = time.perf_counter() - t_hidden
        record = self._record(task, rnd, k, text, finish, extraction, obs, passed, hidden, figures, exec_s,
                              manifest, sampling)
        attempt = Attempt(rnd, k, text, extraction.code, obs, passed, outputs, record)
        attempt.id = self.traces.add_attempt(trace_id, messages, **record)
        record["id"] = attempt.id
        record["loop_overhead_s"] = round(time.perf_counter() - t0 - exec_s - hidden_s, 5)
        return attempt

    async def _namespace_names(self, key: str) -> list[str] | None:
        """The names the kernel's namespace holds now (one silent execute); None when it cannot say."""
        expr = "__import__('json').dumps(sorted(k for k in get_ipython().user_ns if isinstance(k, str)))"
        try:
            res = await self.pool.execute(key, "", silent=True, store_history=False, timeout=self.config.exec_timeout,
                                          user_expressions={"names": expr})
            out = (res.user_expressions or {}).get("names") or {}
            if out.get("status") != "ok":
                return None
            return json.loads(ast.literal_eval((out.get("data") or {}).get("text/plain", "")))
        except Exception:  # noqa: BLE001 - without the names, the code runs unchecked as before
            return None

    async def _execute(self, task: Task, code: str) -> tuple[dict, list[dict], float]:
        """Compile, run, then run the visible checks; the observation the feedback is built from."""
        cfg = self.config
        bad = syntax_error_obs(code)
        if bad is not None:
            return bad, [], 0.0
        if cfg.fresh_namespace:
            await self.pool.execute(task.kernel_key, RESET_NAMESPACE, silent=True, store_history=False)
        if cfg.static_check:
            names = await self._namespace_names(task.kernel_key)
            findings = certain_failures(code, defined=names) if names is not None else []
            if findings:
                return observation(findings), [], 0.0
        self._running_key = task.kernel_key
        t0 = time.perf_counter()
        try:
            res = await self.pool.execute(task.kernel_key, instrument_candidate(code), timeout=cfg.exec_timeout,
                                          on_batch=self.on_batch)
            stdout = res.stdout
            local_info, stderr = parse_locals_output(res.stderr)
            outputs = _clean_outputs(res.outputs)
            obs: dict[str, Any] = {"status": res.status, "stdout": stdout, "stderr": stderr,
                                   "truncated": res.truncated, "timeout_s": cfg.exec_timeout}
            if res.error:
                obs.update(ename=res.error.get("ename"), evalue=res.error.get("evalue"),
                           traceback=[strip_ansi(line) for line in res.error.get("traceback") or []])
            if local_info:
                obs["locals"] = local_info
            if res.status == "ok" and task.checks:
                cres = await self.pool.execute(task.kernel_key, instrument(task.checks), timeout=cfg.exec_timeout,
                                               store_history=False)
                report, check_out = parse_check_output(cres.stdout)
                if cres.status != "ok" or report is None:
                    obs.update(status="timeout" if cres.status == "timeout" else cres.status if cres.status in
                               ("died", "interrupted") else "error",
                               ename=(cres.error or {}).get("ename"), evalue=(cres.error or {}).get("evalue"),
                               traceback=[strip_ansi(x) for x in (cres.error or {}).get("traceback") or []])
                else:
                    obs["checks"] = report.to_dict()
                    if not report.ok:
                        obs["status"] = "check_failed"
                    if check_out.strip():
                        obs["stdout"] = stdout + check_out
        finally:
            self._running_key = None
        return obs, outputs, time.perf_counter() - t0

    async def _score_hidden(self, task: Task, code: str) -> bool:
        """Run the code afresh with the hidden tests; never shown to the model, never fed back."""
        key = task.kernel_key
        await self.pool.execute(key, RESET_NAMESPACE, silent=True, store_history=False)
        res = await self.pool.execute(key, instrument_candidate(code), timeout=self.config.exec_timeout,
                                      store_history=False)
        if res.status != "ok":
            return False
        cres = await self.pool.execute(key, instrument(task.hidden_tests), timeout=self.config.exec_timeout,
                                       store_history=False)
        report, _ = parse_check_output(cres.stdout)
        await self.pool.execute(key, RESET_NAMESPACE, silent=True, store_history=False)
        return bool(cres.status == "ok" and report is not None and report.ok)

    def _record(self, task: Task, rnd: int, k: int, text: str, finish: str | None, extraction, obs: dict,
                passed: bool, hidden: bool | None, figures: dict, exec_s: float, manifest: dict,
                sampling: Sampling) -> dict:
        stdout, stderr = obs.get("stdout") or "", obs.get("stderr") or ""
        cap = 20_000
        feedback = None if passed else feedback_message(obs, self.config.feedback)
        return {
            "round": rnd, "candidate": k, "dialog_id": task.dialog_id, "message_id": task.message_id,
            "task_id": task.task_id, "task_source": task.task_source, "completion": text, "finish_reason": finish,
            "code": extraction.code, "extracted": bool(extraction.ok and extraction.code),
            # A generation that failed says why, so a trace of a dead server is readable later.
            "extract_reason": f"model error: {figures['error']}" if figures.get("error") else extraction.reason,
            "exec_status": obs["status"], "passed": passed,
            "ename": obs.get("ename"), "evalue": obs.get("evalue"), "traceback": obs.get("traceback") or [],
            "stdout": stdout[-cap:], "stderr": stderr[-cap:], "stdout_chars": len(stdout),
            "stderr_chars": len(stderr), "truncated": bool(obs.get("truncated") or len(stdout) > cap or len(stderr) > cap),
            "checks": obs.get("checks"), "locals": obs.get("locals"), "feedback": feedback, "hidden_passed": hidden,
            "ttft_s": figures.get("ttft_s"), "prompt_eval_s": figures.get("prompt_eval_s"),
            "decode_s": figures.get("decode_s"), "tokens_per_s": figures.get("tokens_per_s"),
            "exec_s": round(exec_s, 5), "prompt_tokens": figures.get("prompt_tokens"),
            "cached_prompt_tokens": figures.get("cached_prompt_tokens"),
            "completion_tokens": figures.get("completion_tokens"), "manifest": manifest,
            "sampling": sampling.as_dict(), "author": "model", "static": bool(obs.get("static")),
        }

    # -- fix: the human's failing cell is round 0 ----------------------------------------------------

    async def _human_attempt(self, task: Task, trace_id: int) -> Attempt:
        h = task.human_attempt
        obs = dict(h["obs"])
        completion = f"```python\n{h['code']}\n```"
        feedback = feedback_message(obs, self.config.feedback)

        class _X:  # the human's code needs no extraction
            ok, code, reason = True, h["code"], "human"

        record = self._record(task, 0, 0, completion, None, _X, obs, False, None, {}, 0.0,
                              {}, self.config.sampling)
        record.update(author="human", feedback=feedback)
        attempt = Attempt(0, 0, completion, h["code"], obs, False, [], record)
        attempt.id = self.traces.add_attempt(trace_id, task.messages, **record)
        record["id"] = attempt.id
        return attempt

    @staticmethod
    def _with_fix_request(messages: list[dict], human: Attempt) -> list[dict]:
        """The context plus a user turn with the failing code and what went wrong."""
        ask = f"I ran this code:\n```python\n{human.code}\n```\n\n{human.record['feedback']}"
        last = messages[-1] if messages else {}
        if last.get("role") == "user" and isinstance(last.get("content"), str):
            return messages[:-1] + [{"role": "user", "content": f"{last['content']}\n\n{ask}"}]
        return messages + [{"role": "user", "content": ask}]
