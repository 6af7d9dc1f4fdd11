"""Model engine figures, side by side in one run, same model and prompt.

  python bench/bench_model.py [--model smollm2-135m|qwen2.5-coder-1.5b|PATH] [--turns 20]

1. Decode tokens/s through the Engine (worker thread + asyncio stream, the app's path) vs raw
   llama_cpp.Llama.generate on the same loaded model, interleaved rounds; target ratio >= 0.95.
2. Time to first token on turn 1 vs turn N of a dialog growing about 100 tokens a turn, alone and
   alternating two dialogs; target ratio <= 1.5. Prompt tokens evaluated per turn (<= new + 32).
3. The KV state mechanism: per-sequence state save/restore (ours) vs Llama.save_state/load_state
   (what LlamaRAMCache does), at the size of the last turn's context.
"""
from __future__ import annotations

import argparse
import asyncio
import ctypes
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from local_model import Engine, Sampling, load_backend  # noqa: E402

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


def bench_decode(backend, engine: Engine, n: int, rounds: int) -> None:
    llm = backend.llm
    tokens = llm.tokenize(backend.render(DECODE_PROMPT).encode(), add_bos=False, special=True)
    raw_decode(llm, tokens, 8)  # warm up both paths
    engine_decode(engine, 8)
    raws, engs = [], []
    for r in range(rounds):
        raws.append(raw_decode(llm, tokens, n))
        rate, count = engine_decode(engine, n)
        engs.append(rate)
        print(f"  round {r + 1}: raw {raws[-1]:6.1f} tok/s   engine {engs[-1]:6.1f} tok/s   ({count} tokens)")
    raw_m, eng_m = statistics.median(raws), statistics.median(engs)
    print(f"decode tokens/s, median of {rounds}: raw llama_cpp.Llama {raw_m:.1f}, Engine {eng_m:.1f}, "
          f"ratio {eng_m / raw_m:.3f} (target >= 0.95)")


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
    return rows


def print_dialog(rows: dict, label: str) -> list[float]:
    ratios = []
    for key, rs in rows.items():
        print(f"  {label}, dialog {key}: turn  prompt  evaluated  new+32  ttft_s  kv")
        for r in rs:
            flag = "" if r["evaluated"] <= r["new"] + 32 or r["turn"] == 1 else "  OVER"
            print(f"    {r['turn']:>4} {r['prompt']:>7} {r['evaluated']:>10} {r['new'] + 32:>7} {r['ttft']:7.3f}  {r['kv']}{flag}")
        ratio = rs[-1]["ttft"] / rs[0]["ttft"]
        ratios.append(ratio)
        print(f"  {label}, dialog {key}: TTFT turn 1 {rs[0]['ttft']:.3f} s, turn {rs[-1]['turn']} {rs[-1]['ttft']:.3f} s, "
              f"ratio {ratio:.2f} (target <= 1.5); growth {(rs[-1]['prompt'] - rs[0]['prompt']) / (len(rs) - 1):.0f} tokens/turn")
    return ratios


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
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reply-tokens", type=int, default=16)
    ap.add_argument("--words", type=int, default=72, help="words per user turn (about 100 tokens with the reply)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--n-ctx", type=int, default=4096)
    args = ap.parse_args()

    t = time.perf_counter()
    backend = load_backend(args.model, n_ctx=args.n_ctx, n_threads=args.threads)
    load_s = time.perf_counter() - t
    m = backend.manifest
    print(f"machine: {platform.node()} {platform.machine()}, {__import__('os').cpu_count()} cores; "
          f"python {platform.python_version()}, llama-cpp-python {m['llama_cpp_version']}")
    print(f"model: {m['model']} ({m['file_name']}, {m['quant']}), loaded in {load_s:.2f} s; {m['gpu']}; "
          f"n_ctx {m['n_ctx']}, n_threads {m['n_threads']}")
    if m.get("note"):
        print(f"note: {m['note']}")
    engine = Engine(backend)
    try:
        print(f"\n[1] decode speed, {args.decode_tokens} tokens, {args.rounds} interleaved rounds")
        bench_decode(backend, engine, args.decode_tokens, args.rounds)

        print(f"\n[2] growing dialogs, {args.turns} turns of about {args.words} words + {args.reply_tokens}-token replies")
        single = print_dialog(run_dialogs(engine, ["a"], args.turns, args.words, args.reply_tokens, "solo"), "alone")
        pair = print_dialog(run_dialogs(engine, ["a", "b"], args.turns, args.words, args.reply_tokens, "pair"), "alternating")

        print("\n[3] KV state mechanism")
        bench_state_mechanisms(backend)

        print("\nsummary")
        print(f"  TTFT ratio turn {args.turns}/turn 1: alone {single[0]:.2f}, alternating "
              f"{' and '.join(f'{r:.2f}' for r in pair)} (target <= 1.5)")
    finally:
        engine.close()


if __name__ == "__main__":
    main()
