"""Selection's threshold, measured: for each round with several candidates in an eval run's traces, re-run
`choose` on the recorded groups with margins 0..4 and score the winner on the hidden tests (each candidate's
hidden result is stored), beside greedy alone, the first candidate that passed the visible checks, and an oracle.

    python bench/bench_select.py --data-dir DIR --run NAME
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from execfeedback.loop.select import Candidate, choose  # noqa: E402
from execfeedback.traces import TraceStore, open_store  # noqa: E402


def rounds_of(traces: TraceStore, run_id: int):
    for t in traces.iter_traces("eval_run_id = ?", (run_id,)):
        by_round: dict[int, list[dict]] = {}
        for a in traces.attempts(t["id"]):
            if a.get("selection") is not None:
                by_round.setdefault(a["round"], []).append(a)
        yield from by_round.values()


def score(groups_of_rounds: list[list[dict]], margins=(0, 1, 2, 3, 4)) -> dict:
    out = {"rounds": len(groups_of_rounds), "greedy": 0, "first_visible_pass": 0, "oracle": 0}
    out.update({f"margin_{m}": 0 for m in margins})
    switched = {m: 0 for m in margins}
    for atts in groups_of_rounds:
        atts = sorted(atts, key=lambda a: a["candidate"])
        hidden = {a["candidate"]: bool(a.get("hidden_passed")) for a in atts}
        out["greedy"] += hidden.get(0, False)
        first = next((a for a in atts if a.get("passed")), None)
        out["first_visible_pass"] += bool(first and hidden[first["candidate"]])
        out["oracle"] += any(hidden.values())
        cands = [Candidate(a["candidate"], bool(a["selection"]["survived"]),
                           None if a["selection"]["group"] is None else str(a["selection"]["group"])) for a in atts]
        for m in margins:
            w = choose(cands, m).winner
            out[f"margin_{m}"] += hidden.get(0 if w is None else w, False)
            switched[m] += w not in (None, 0)
    out["switched_from_greedy"] = {f"margin_{m}": n for m, n in switched.items()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--run", required=True, help="the eval run's name")
    args = ap.parse_args()
    traces = TraceStore(open_store(args.data_dir))
    run = traces.eval_run(args.run)
    if not run:
        raise SystemExit(f"no eval run named {args.run}")
    res = score(list(rounds_of(traces, run["id"])))
    for k, v in res.items():
        print(f"{k:>22}: {v}")


if __name__ == "__main__":
    main()
