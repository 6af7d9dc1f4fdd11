"""The execution-feedback ablation, read from eval runs' stored traces: pass@1 on the hidden tests, tokens generated
per problem and wall time per problem for greedy; + static analysis; + k-candidate filter; + clustering; then each
full pipeline (a repair variant).

Rows that are prefixes of one pipeline are read from that run's traces, and say so:
- greedy: round 0 of a run with --candidates 1 (its round 0 is the greedy answer alone), else candidate 0 of a
  k-candidate run's round 0 (then its time is the batch's, an overstatement);
- + static analysis: the same pass@1 (round 0 alone feeds nothing back); the count says how many round-0 failures
  were caught before running, which the feedback rounds then see without a run;
- + k-candidate filter: round 0 of a --candidates K run, the first candidate that passed the visible checks (greedy
  when it did), else greedy;
- + clustering: the same round, the candidate selection by execution chose;
- each full run: the answer the loop ended with (its final round).
Only problems finished in every run are counted. Time per problem runs from a trace's start to its last attempt
of the rows' rounds (scoring on the hidden tests included: a small share).

    python bench/bench_ablation.py --data-dir DIR --candidates-run NAME --run NAME [--run NAME ...]
"""
from __future__ import annotations

import argparse
import os
import sys
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from execfeedback.eval.runner import FINISHED, passed_by_round  # noqa: E402
from execfeedback.traces import TraceStore, open_store  # noqa: E402


def _t(stamp: str) -> float:
    return datetime.fromisoformat(stamp).timestamp()


def finished(traces: TraceStore, name: str) -> tuple[dict, dict[str, tuple[dict, list[dict]]]]:
    """The eval run's config and its finished problems: task id -> (trace, attempts)."""
    run = traces.eval_run(name)
    if not run:
        raise SystemExit(f"no eval run named {name!r} in this data dir")
    out = {}
    for t in traces.iter_traces("eval_run_id = ?", (run["id"],)):
        if t["status"] in FINISHED:
            out[t["task_id"]] = (t, traces.attempts(t["id"]))
    return run, out


def tokens(atts: list[dict]) -> int:
    """Tokens generated: the completions plus the selection's model-written inputs (counted once per round)."""
    return sum((a.get("completion_tokens") or 0) + ((a.get("selection") or {}).get("inputs_tokens") or 0)
               for a in atts if a.get("author", "model") == "model")


def elapsed(trace: dict, atts: list[dict]) -> float:
    return max(_t(a["created_at"]) for a in atts) - _t(trace["created_at"]) if atts else 0.0


def round0(trace: dict, atts: list[dict]) -> dict:
    r0 = sorted((a for a in atts if a["round"] == 0), key=lambda a: a["candidate"])
    greedy = r0[0] if r0 else {}
    hidden = {a["candidate"]: bool(a.get("hidden_passed")) for a in r0}
    first = next((a for a in r0 if a.get("passed")), greedy)
    chosen = next((a for a in r0 if (a.get("selection") or {}).get("chosen")), first)
    return {"greedy": hidden.get(0, False), "filter": hidden.get(first.get("candidate"), False),
            "cluster": hidden.get(chosen.get("candidate"), False), "oracle": any(hidden.values()),
            "greedy_tokens": greedy.get("completion_tokens") or 0, "tokens": tokens(r0),
            "time": elapsed(trace, r0), "k": len(r0),
            "greedy_failed": not greedy.get("passed", False), "greedy_static": bool(greedy.get("static")),
            "failed": sum(1 for a in r0 if not a.get("passed")), "static": sum(1 for a in r0 if a.get("static"))}


def full(trace: dict, atts: list[dict]) -> dict:
    cfg = trace.get("config") or {}
    pbr = passed_by_round(atts, trace.get("rounds") or 0, trace.get("final_attempt_id"))
    return {"pass": bool(pbr[-1]), "round0": bool(pbr[0]), "tokens": tokens(atts), "time": elapsed(trace, atts),
            "regressed": any(a and not b for a, b in zip(pbr, pbr[1:])), "cfg": cfg}


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def table(rows: list[tuple[str, list[bool], list[float], list[float], str]], n: int) -> str:
    out = ["| row | pass@1 (hidden) | tokens / problem | wall s / problem | read from |",
           "| --- | --- | --- | --- | --- |"]
    for label, passed, toks, secs, source in rows:
        out.append(f"| {label} | {100 * sum(passed) / n:.1f} ({sum(passed)}/{n}) | {mean(toks):.0f} | "
                   f"{mean(secs):.1f} | {source} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--candidates-run", default=None,
                    help="an eval run with --candidates K > 1: the filter and clustering rows read its round 0 "
                         "(without it: greedy, static analysis and the full runs, paired on the same problems)")
    ap.add_argument("--run", action="append", default=[], help="a full pipeline run (repeatable)")
    ap.add_argument("--failures-run", action="append", default=[],
                    help="a full pipeline run over only the problems the greedy run failed at round 0 (a subset "
                         "file): each problem it lacks that greedy passed is counted as greedy's round 0, which is "
                         "the same answer (candidates 1, temperature 0) (repeatable)")
    ap.add_argument("--greedy-run", default=None,
                    help="a run with --candidates 1 whose round 0 is the greedy row (default: the first --run "
                         "with candidates 1, else candidate 0 of --candidates-run)")
    args = ap.parse_args()
    traces = TraceStore(open_store(args.data_dir))
    full_runs = list(dict.fromkeys(([args.candidates_run] if args.candidates_run else []) + args.run
                                   + args.failures_run))
    if not full_runs:
        raise SystemExit("give --candidates-run, --run or both")
    runs = {name: finished(traces, name) for name in full_runs}
    greedy_run = args.greedy_run or next((n for n in args.run if runs[n][0]["config"].get("candidates") == 1), None)
    if greedy_run and greedy_run not in runs:
        runs[greedy_run] = finished(traces, greedy_run)
    for name in args.failures_run:
        if not greedy_run:
            raise SystemExit("--failures-run needs a greedy run (--greedy-run or a --run with candidates 1)")
        for i, (t, atts) in runs[greedy_run][1].items():
            r0 = [a for a in atts if a["round"] == 0 and a["candidate"] == 0]
            if i not in runs[name][1] and r0 and r0[0].get("hidden_passed"):
                runs[name][1][i] = ({**t, "rounds": 0, "final_attempt_id": r0[0]["id"]}, r0)
    ids = sorted(set.intersection(*(set(done) for _, done in runs.values())))
    n = len(ids)
    if not n:
        raise SystemExit("no problem is finished in every run yet")
    cand = [round0(*runs[args.candidates_run][1][i]) for i in ids] if args.candidates_run else []
    k = max((c["k"] for c in cand), default=1)
    rows = []
    if greedy_run:
        g = [round0(*runs[greedy_run][1][i]) for i in ids]
        rows.append(("greedy", [x["greedy"] for x in g], [x["tokens"] for x in g], [x["time"] for x in g],
                     f"{greedy_run}, round 0"))
        src = g
    elif cand:
        rows.append(("greedy", [x["greedy"] for x in cand], [x["greedy_tokens"] for x in cand],
                     [x["time"] for x in cand], f"{args.candidates_run}, round 0 candidate 0 (time: the batch's)"))
        src = cand
    else:
        raise SystemExit("no run has a greedy round 0: give --greedy-run or a --candidates 1 run")
    failed = sum(x["greedy_failed"] for x in src)
    caught = sum(x["greedy_static"] for x in src)
    rows.append((f"+ static analysis ({caught} of the {failed} greedy answers that failed their visible checks "
                 "caught before running)",
                 rows[0][1], rows[0][2], rows[0][3], "the same round; pays in the feedback rounds"))
    if cand:
        rows.append((f"+ {k} candidates, filter on the visible checks", [x["filter"] for x in cand],
                     [x["tokens"] for x in cand], [x["time"] for x in cand], f"{args.candidates_run}, round 0"))
        rows.append(("+ clustering (selection by execution)", [x["cluster"] for x in cand],
                     [x["tokens"] for x in cand], [x["time"] for x in cand], f"{args.candidates_run}, round 0"))
    regressions = {}
    for name in full_runs:
        fs = [full(*runs[name][1][i]) for i in ids]
        c = runs[name][0]["config"]
        if not c.get("rounds"):
            continue  # round 0 alone: the rows above
        first = "greedy first" if c.get("candidates") == 1 else f"{c.get('candidates')} candidates first"
        label = (f"+ retry {c.get('retry')}: {first}, then {c.get('retry_candidates', c.get('candidates'))} "
                 f"candidates in each of {c.get('rounds')} feedback rounds"
                 + (f", {c['retry_fresh']} of them fresh samples of the task" if c.get("retry_fresh") else "")
                 + (f" (model-written inputs {c['select_inputs']})" if c.get("select_inputs") else ""))
        source = name + (f" (problems greedy passed: {greedy_run}'s round 0)" if name in args.failures_run else "")
        rows.append((label, [x["pass"] for x in fs], [x["tokens"] for x in fs], [x["time"] for x in fs], source))
        regressions[name] = sum(x["pass"] is False and x["round0"] for x in fs)
    print(table(rows, n))
    if cand:
        print(f"\noracle (any round-0 candidate of {args.candidates_run} passes): "
              f"{100 * sum(x['oracle'] for x in cand) / n:.1f}")
        print(f"static analysis over all {k} round-0 candidates of {args.candidates_run}: "
              f"{sum(x['static'] for x in cand)} of {sum(x['failed'] for x in cand)} failures caught before running")
    print("regressions against the run's own round 0: " + ", ".join(f"{k} {v}" for k, v in regressions.items()))
    manifest = runs[full_runs[0]][1][ids[0]][0].get("manifest") or {}
    print(f"\n{n} problems finished in every run; model {manifest.get('model')}, backend {manifest.get('backend')}, "
          f"threads {manifest.get('n_threads') or manifest.get('threads')}; this machine: {os.cpu_count()} CPUs, "
          f"load now {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
