"""k candidates from one prompt: one batch (the prompt read once, k sequences per llama_decode) against
k generations in turn. Same model, same prompt, same sampling, one run.

  python bench/bench_batch.py [--model qwen2.5-coder-1.5b|smollm2-135m|PATH] [--ks 1,2,4,8,16] [--tokens 96]

Prints aggregate decode tokens/s for each k, both ways, and the ratio. Targets: >= 1.6x at k = 8 on
2 CPU cores; >= 8x at k = 16 on a GPU.

Then a feedback round's mix (`--mixed`, default 4): half the candidates answer a feedback turn, half sample
the task's round-0 prompt afresh (retry_fresh): one batch with a prompt per sequence against one batch per
prompt.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from local_model import Sampling, load_backend  # noqa: E402

PROMPT = [{"role": "system", "content": "You write Python. Answer with one fenced code block."},
          {"role": "user", "content": "Write a function `merge_intervals(intervals)` that merges overlapping "
                                      "intervals given as (start, end) pairs and returns them sorted. Explain it."}]


def samplings(k: int, tokens: int) -> list[Sampling]:
    # Candidate 0 greedy, the rest sampled, as the loop draws them; no stop at EOS is forced, so lengths vary
    # the same way on both sides.
    return [Sampling(max_tokens=tokens)] + [Sampling(max_tokens=tokens, temperature=0.8, seed=s) for s in range(1, k)]


def batched(backend, k: int, tokens: int) -> tuple[int, float]:
    t = time.perf_counter()
    done = [ev for ev in backend.stream_many(PROMPT, samplings(k, tokens)) if ev["type"] == "done"]
    return sum(ev["figures"]["completion_tokens"] for ev in done), time.perf_counter() - t


FEEDBACK = PROMPT + [{"role": "assistant", "content": "```python\ndef merge_intervals(intervals):\n    return "
                                                   "sorted(intervals)\n```"},
                     {"role": "user", "content": "merge_intervals([(1, 3), (2, 4)]) returned [(1, 3), (2, 4)], "
                                                 "expected [(1, 4)]. Return the whole corrected code."}]


def mixed(backend, k: int, tokens: int, one_batch: bool) -> tuple[int, float]:
    """k candidates, the last k // 2 from the round-0 prompt: one batch, or one batch per prompt."""
    s, fresh = samplings(k, tokens), k // 2
    t = time.perf_counter()
    if one_batch:
        evs = list(backend.stream_many(FEEDBACK, s, seq_messages=[None] * (k - fresh) + [PROMPT] * fresh))
    else:
        evs = list(backend.stream_many(FEEDBACK, s[:k - fresh])) + list(backend.stream_many(PROMPT, s[k - fresh:]))
    return sum(ev["figures"]["completion_tokens"] for ev in evs if ev["type"] == "done"), time.perf_counter() - t


def in_turn(backend, k: int, tokens: int) -> tuple[int, float]:
    t = time.perf_counter()
    n = 0
    for s in samplings(k, tokens):
        n += [ev for ev in backend.stream(PROMPT, s)][-1]["figures"]["completion_tokens"]
    return n, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--ks", default="1,2,4,8,16")
    ap.add_argument("--tokens", type=int, default=96, help="tokens per candidate (at most)")
    ap.add_argument("--n-ctx", type=int, default=4096)
    ap.add_argument("--mixed", type=int, default=4, help="candidates in the feedback-round mix (0: skip it)")
    args = ap.parse_args()
    ks = [int(x) for x in args.ks.split(",")]
    backend = load_backend(args.model, n_ctx=args.n_ctx)
    m = backend.manifest
    print(f"{m['file_name']} on {platform.processor() or platform.machine()}: {m['gpu']}; {m['threads']}; "
          f"{m.get('cpu_buffers')}")
    batched(backend, 2, 8)  # warm both paths
    in_turn(backend, 1, 8)
    print(f"{'k':>3} {'batch tok':>9} {'batch s':>8} {'batch tok/s':>11} {'in turn tok':>11} {'in turn s':>9} "
          f"{'in turn tok/s':>13} {'ratio':>6}")
    for k in ks:
        bt, bs = batched(backend, k, args.tokens)
        st, ss = in_turn(backend, k, args.tokens)
        print(f"{k:>3} {bt:>9} {bs:>8.2f} {bt / bs:>11.1f} {st:>11} {ss:>9.2f} {st / ss:>13.1f} "
              f"{(bt / bs) / (st / ss):>6.2f}x")
    if args.mixed > 1:
        ot, os_ = mixed(backend, args.mixed, args.tokens, one_batch=True)
        tt, ts = mixed(backend, args.mixed, args.tokens, one_batch=False)
        print(f"feedback round of {args.mixed}, {args.mixed // 2} fresh: one batch {ot} tok in {os_:.2f} s "
              f"({ot / os_:.1f} tok/s); a batch per prompt {tt} tok in {ts:.2f} s ({tt / ts:.1f} tok/s); "
              f"ratio {(ot / os_) / (tt / ts):.2f}x")
    backend.close()


if __name__ == "__main__":
    main()
