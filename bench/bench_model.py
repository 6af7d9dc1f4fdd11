"""Model engine figures, side by side in one run, same model and prompt.

  python bench/bench_model.py [--model smollm2-135m|qwen2.5-coder-1.5b|PATH] [--turns 20]

1. Decode tokens/s through the Engine (worker thread + asyncio stream, the app's path) vs raw
   llama_cpp.Llama.generate on the same loaded model, interleaved rounds; target ratio >= 0.95.
2. Time to first token on turn 1 vs turn N of a dialog growing about 100 tokens a turn, alone and
   alternating two dialogs; target ratio <= 1.5. Prompt tokens evaluated per turn (<= new + 32).
3. What the cache saves: the last turn's TTFT with the cache vs the same prompt read cold.
4. The KV state mechanism: per-sequence state save/restore (ours) vs Llama.save_state/load_state
   (what LlamaRAMCache does), at the size of the last turn's context.
5. The cost of depth itself: 100 new tokens read at depth 100 vs at the last turn's depth.

TTFT still grows with the dialog because each new token attends to all earlier ones: for a model
as small as SmolLM2-135M that attention is a large share of the work (reading 100 tokens at
depth 2300 measured about 1.7x reading them at depth 100 here, with no cache involved).
"""
from __future__ import annotations

import argparse
import asyncio
import ctypes
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from local_model import Engine, Sampling, load_backend  # noqa: E402
from local_model.backends.llama import new_llama  # noqa: E402

DECODE_PROMPT = [{"role": "user", "content": "Write a long, detailed story about a lighthouse keeper "
                                             "who finds a message in a bottle. Use many paragraphs."}]
WORDS = ("apple river stone cloud lamp forest window garden pencil bridge candle mirror rocket violin "
         "meadow harbor tunnel lantern compass feather").split()


def user_turn(i: int, key: str, n_words: int) -> str:
    body = " ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(n_words))
    return f"[{key}] Note {i}: {body}. Which word comes first?"


def raw_decode(llm, tokens: list[int], n: int) -> float:
    """(n-1) / time between the first and the n-th token, greedy, straight from Llama.generate."""
    llm.reset()
    times = []
    for tok in llm.generate(tokens, top_k=0, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
        times.append(time.perf_counter())
        if len(times) >= n:
            break
    return (len(times) - 1) / (times[-1] - times[0])


def engine_decode(engine: Engine, n: int) -> tuple[float, int]:
    """The same measure through engine.stream, as the app consumes it."""
    async def go():
        times, done = [], None
        async for ev in engine.stream(DECODE_PROMPT, Sampling(max_tokens=n)):
            if ev["type"] == "token":
                times.append(time.perf_counter())
            else:
                done = ev
        return times, done
    times, done = asyncio.run(go())
    count = done["figures"]["completion_tokens"]
    return (count - 1) / (times[-1] - times[0]), count


def best_raw_threads(llm, tokens: list[int], n: int) -> tuple[int, float]:
    """Raw decode at every thread count from 1 to this machine's CPUs: the best one, and its tok/s.

    The engine is compared against the best raw configuration, not against a default that is slow.
    """
    import llama_cpp

    chosen = (llm.n_threads, llm.n_threads_batch)
    best = (chosen[0], 0.0)
    try:
        for t in range(1, (os.cpu_count() or 1) + 1):
            llama_cpp.llama_set_n_threads(llm._ctx.ctx, t, chosen[1])
            rate = max(raw_decode(llm, tokens, n) for _ in range(2))
            print(f"  raw llama_cpp.Llama, {t} decode thread{'s' if t > 1 else ''}: {rate:6.1f} tok/s")
            best = max(best, (t, rate), key=lambda x: x[1])
    finally:
        llama_cpp.llama_set_n_threads(llm._ctx.ctx, *chosen)
    print(f"best raw configuration: {best[0]} decode threads ({best[1]:.1f} tok/s); Loopbook chose {chosen[0]}")
    return best


def bench_decode(backend, engine: Engine, n: int, rounds: int) -> float:
    llm = backend.llm
    tokens = llm.tokenize(backend.render(DECODE_PROMPT).encode(), add_bos=False, special=True)
    raw_decode(llm, tokens, 8)  # warm up both paths
    engine_decode(engine, 8)
    best_threads, _ = best_raw_threads(llm, tokens, n)
    if best_threads != llm.n_threads:
        print(f"  note: the rounds below run at Loopbook's {llm.n_threads} threads; the best raw run used "
              f"{best_threads} (LOOPBOOK_THREADS sets it)")
    raws, engs, ratios = [], [], []
    for r in range(rounds):
        # Alternate which goes first, so a slow spell on this shared machine hits both sides.
        if r % 2 == 0:
            raw = raw_decode(llm, tokens, n)
            eng, count = engine_decode(engine, n)
        else:
            eng, count = engine_decode(engine, n)
            raw = raw_decode(llm, tokens, n)
        raws.append(raw)
        engs.append(eng)
        ratios.append(eng / raw)
        print(f"  round {r + 1:>2}: raw {raw:6.1f} tok/s   engine {eng:6.1f} tok/s   ratio {eng / raw:.3f}   ({count} tokens)")
    raw_m, eng_m = statistics.median(raws), statistics.median(engs)
    print(f"decode tokens/s, median of {rounds}: raw llama_cpp.Llama {raw_m:.1f}, Engine {eng_m:.1f}; "
          f"ratio of medians {eng_m / raw_m:.3f}, median of paired ratios {statistics.median(ratios):.3f} "
          f"(target >= 0.95)")
    return statistics.median(ratios)


def run_dialogs(engine: Engine, keys: list[str], turns: int, n_words: int, reply_tokens: int, tag: str) -> dict:
    dialogs = {k: [] for k in keys}
    rows = {k: [] for k in keys}
    count = engine.backend.count_tokens
    for turn in range(turns):
        for key in keys:
            msgs = dialogs[key]
            text = user_turn(turn, f"{tag}-{key}", n_words)
            msgs.append({"role": "user", "content": text})
            done = engine.generate(msgs, Sampling(max_tokens=reply_tokens), cache_key=f"{tag}-{key}")
            f = done["figures"]
            rows[key].append({"turn": turn + 1, "ttft": f["ttft_s"], "prompt": f["prompt_tokens"],
                              "evaluated": f["evaluated_prompt_tokens"], "new": count(text),
                              "reply": f["completion_tokens"], "kv": f["kv"]})
            msgs.append({"role": "assistant", "content": done["text"]})
    rows["_dialogs"] = dialogs
    return rows


def bench_dialogs(engine: Engine, keys: list[str], args, label: str) -> tuple[float, list, dict]:
    """Runs the dialog(s) `repeats` times with fresh keys; TTFT per turn is the median over runs."""
    runs, probes = [], []
    for r in range(args.repeats):
        runs.append(run_dialogs(engine, keys, args.turns, args.words, args.reply_tokens, f"{label}{r}"))
        # A fresh dialog's first turn right after the last turn: a baseline taken at the same
        # moment, so a machine that got busier or quieter during the run does not skew the ratio.
        probes.append(run_dialogs(engine, ["p"], 1, args.words, args.reply_tokens, f"{label}{r}probe")["p"][0]["ttft"])
    over = 0
    worst = 0.0
    dialogs = [run.pop("_dialogs") for run in runs]
    for key in keys:
        rs = runs[0][key]
        ttft = [statistics.median(run[key][i]["ttft"] for run in runs) for i in range(len(rs))]
        print(f"  {label}, dialog {key}: turn  prompt  evaluated  new+32  ttft_s (median of {args.repeats})  kv")
        for r, t in zip(rs, ttft):
            bad = r["turn"] > 1 and r["evaluated"] > r["new"] + 32
            over += bad
            print(f"    {r['turn']:>4} {r['prompt']:>7} {r['evaluated']:>10} {r['new'] + 32:>7} {t:8.3f}  {r['kv']}"
                  + ("  OVER" if bad else ""))
        ratio = ttft[-1] / ttft[0]
        paired = statistics.median(run[key][-1]["ttft"] / p for run, p in zip(runs, probes))
        worst = max(worst, ratio)
        print(f"  {label}, dialog {key}: TTFT turn 1 {ttft[0]:.3f} s, turn {rs[-1]['turn']} {ttft[-1]:.3f} s, "
              f"ratio {ratio:.2f} (target <= 1.5); turn {rs[-1]['turn']} / a fresh turn 1 read right after: "
              f"{paired:.2f}; prompt grows {(rs[-1]['prompt'] - rs[0]['prompt']) / (len(rs) - 1):.0f} tokens/turn")
    print(f"  {label}: turns evaluating more than their new tokens + 32: {over}")
    return worst, dialogs[-1][keys[0]], runs[-1][keys[0]][-1]


def bench_depth(backend, depth: int, reps: int = 4) -> float:
    """Reading 100 new tokens at depth 100 vs `depth`, interleaved, on two fresh contexts: the
    part of TTFT growth that no cache can remove (each new token attends to all earlier ones)."""
    llm0 = backend.llm
    mk = lambda: new_llama(model_path=llm0.model_path, n_ctx=backend.n_ctx, verbose=False,  # noqa: E731
                           n_threads=llm0.n_threads, n_threads_batch=llm0.n_threads_batch,
                           n_gpu_layers=backend.plan.n_gpu_layers, flash_attn=backend.plan.flash_attn)
    text = " ".join(user_turn(i, "depth", 72) for i in range(40)).encode()
    toks = llm0.tokenize(text, add_bos=False)[: depth + 100]
    sides = {"shallow": (mk(), 100), "deep": (mk(), depth)}
    for llm, base in sides.values():
        llm.eval(toks[:base])
    times = {"shallow": [], "deep": []}
    for r in range(reps):
        for name in (("shallow", "deep") if r % 2 == 0 else ("deep", "shallow")):
            llm, base = sides[name]
            llm._ctx.kv_cache_seq_rm(-1, base, -1)
            llm.n_tokens = base
            t = time.perf_counter()
            llm.eval(toks[base:base + 100])
            times[name].append(time.perf_counter() - t)
    for llm, _ in sides.values():
        llm.close()
    s, d = statistics.median(times["shallow"]), statistics.median(times["deep"])
    print(f"  100 new tokens at depth 100: {s:.3f} s, at depth {depth}: {d:.3f} s (median of {reps}, interleaved): "
          f"ratio {d / s:.2f}")
    return d / s


def bench_state_mechanisms(backend) -> None:
    import llama_cpp

    llm = backend.llm
    n = llm.n_tokens
    ctx = llm.ctx
    t = time.perf_counter()
    size = llama_cpp.llama_state_seq_get_size(ctx, 0)
    buf = (ctypes.c_uint8 * size)()
    llama_cpp.llama_state_seq_get_data(ctx, buf, size, 0)
    seq_save = time.perf_counter() - t
    t = time.perf_counter()
    llama_cpp.llama_state_seq_set_data(ctx, buf, size, 0)
    seq_load = time.perf_counter() - t
    t = time.perf_counter()
    state = llm.save_state()
    full_save = time.perf_counter() - t
    t = time.perf_counter()
    llm.load_state(state)
    full_load = time.perf_counter() - t
    print(f"KV state at {n} tokens: per-sequence state {size / 1e6:.1f} MB, save {seq_save * 1e3:.1f} ms + "
          f"restore {seq_load * 1e3:.1f} ms;  Llama.save_state/load_state (LlamaRAMCache) "
          f"{(state.llama_state_size + state.scores.nbytes + state.input_ids.nbytes) / 1e6:.1f} MB, "
          f"save {full_save * 1e3:.1f} ms + restore {full_load * 1e3:.1f} ms")
    print(f"  -> per-sequence state is {(full_save + full_load) / max(seq_save + seq_load, 1e-9):.1f}x faster "
          f"per dialog switch (LlamaRAMCache also saves after every completion, not only on a switch)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--turns", type=int, default=20)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3, help="dialog runs; TTFT per turn is their median")
    ap.add_argument("--reply-tokens", type=int, default=16)
    ap.add_argument("--words", type=int, default=72, help="words per user turn (about 100 tokens with the reply)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--threads-batch", type=int, default=None)
    ap.add_argument("--n-ctx", type=int, default=4096)
    args = ap.parse_args()

    t = time.perf_counter()
    backend = load_backend(args.model, n_ctx=args.n_ctx, n_threads=args.threads, n_threads_batch=args.threads_batch)
    load_s = time.perf_counter() - t
    m = backend.manifest
    print(f"machine: {platform.node()} {platform.machine()}, {__import__('os').cpu_count()} cores; "
          f"python {platform.python_version()}, llama-cpp-python {m['llama_cpp_version']}")
    print(f"model: {m['model']} ({m['file_name']}, {m['quant']}), loaded in {load_s:.2f} s; {m['gpu']}; "
          f"n_ctx {m['n_ctx']}; threads: {m['threads']}")
    if m.get("note"):
        print(f"note: {m['note']}")
    engine = Engine(backend)
    try:
        print(f"\n[1] decode speed, {args.decode_tokens} tokens, {args.rounds} interleaved rounds")
        decode_ratio = bench_decode(backend, engine, args.decode_tokens, args.rounds)

        print(f"\n[2] growing dialogs, {args.turns} turns of {args.words} words + {args.reply_tokens}-token replies")
        alone, dialog, last = bench_dialogs(engine, ["a"], args, "alone")
        pair, _, _ = bench_dialogs(engine, ["a", "b"], args, "alternating")

        print("\n[3] what the cache saves: the last turn's prompt read cold (a different system line, so no prefix is shared)")
        msgs = dialog[:-1]  # the last prompt of the last "alone" run, without its reply
        cold = engine.generate([{"role": "system", "content": "You are a careful assistant."}] + msgs,
                               Sampling(max_tokens=1))["figures"]
        print(f"  turn {args.turns}: cached TTFT {last['ttft']:.3f} s ({last['evaluated']} tokens evaluated) vs cold "
              f"{cold['ttft_s']:.3f} s ({cold['evaluated_prompt_tokens']} tokens): {cold['ttft_s'] / last['ttft']:.1f}x")

        print("\n[4] KV state mechanism")
        bench_state_mechanisms(backend)

        print("\n[5] the attention cost of depth, with no cache logic involved")
        depth = bench_depth(backend, last["prompt"])

        print("\nsummary")
        print(f"  decode Engine/raw: {decode_ratio:.3f} (target >= 0.95)")
        print(f"  TTFT turn {args.turns} / turn 1: alone {alone:.2f}, alternating (worse dialog) {pair:.2f} "
              f"(target <= 1.5); of which reading at depth alone costs {depth:.2f}x")
    finally:
        engine.close()


if __name__ == "__main__":
    main()
