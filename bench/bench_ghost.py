"""Ghost text: request to suggestion while typing, with the coder model (fill-in-the-middle).

  python bench/bench_ghost.py [--model qwen2.5-coder-1.5b|smollm2-135m|PATH] [--pauses 40] [--max-tokens 48]

Types new functions into the middle of a file (the code below the cursor, which is there already, is the
suffix; the text still to be typed is not) and pauses every few characters, as the page's debounce does; at each pause it asks local_model.ghost.ghost_complete (what the
page's POST /api/dialogs/{id}/ghost runs in a worker thread) and records:
- request to suggestion (the page shows the suggestion when the call returns) and request to first token;
- prompt tokens evaluated against the bound: typed characters since the last completion, as tokens, plus the
  suffix, plus 32.
Targets: request to suggestion p50 <= 1.5 s on 2 CPU cores, <= 150 ms on a GPU. Prints `uptime` (load).
Last, an Ask's time to first token alone and started while a long completion runs (which gives way to it).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from local_model import Engine, Sampling, load_backend  # noqa: E402
from local_model.ghost import ghost_complete  # noqa: E402

ABOVE = '''"""Inventory of a small shop."""
from dataclasses import dataclass, field


@dataclass
class Item:
    name: str
    price: float
    quantity: int = 0


'''
TYPED = '''def total_value(items: list[Item]) -> float:
    """The value of everything in stock."""
    return sum(item.price * item.quantity for item in items)


def restock(items: list[Item], name: str, amount: int) -> None:
    for item in items:
        if item.name == name:
            item.quantity += amount
            return
    raise KeyError(name)


def cheapest(items: list[Item]) -> Item:
    return min(items, key=lambda item: item.price)
'''
SUFFIX = '''

if __name__ == "__main__":
    stock = [Item("pen", 1.5, 10), Item("book", 12.0, 2)]
    print(total_value(stock))
    restock(stock, "pen", 5)
    print(cheapest(stock).name)
'''


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(Path("~/.loopbook/models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf")
                                           .expanduser()))
    ap.add_argument("--pauses", type=int, default=40, help="completions asked while typing")
    ap.add_argument("--every", type=int, default=0, help="characters typed between pauses (default: spread the "
                                                         "pauses over the typed text)")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--n-gpu-layers", type=int, default=None)
    a = ap.parse_args()

    print("uptime before:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    t = time.perf_counter()
    backend = load_backend(a.model, n_ctx=8192, n_gpu_layers=a.n_gpu_layers, data_dir=tempfile.mkdtemp())
    engine = Engine(backend)
    load_s = time.perf_counter() - t
    m = backend.manifest
    print(f"model {m['model']} ({m.get('quant')}), {m.get('gpu') or 'CPU'}; {m.get('threads')}; loaded in "
          f"{load_s:.1f} s")
    count = lambda s: len(backend.llm.tokenize(s.encode(), add_bos=False, special=False))  # noqa: E731
    # What the machine gives this model right now (other work shares the cores), to read the figures against.
    ref = engine.generate([{"role": "user", "content": "Count from 1 to 50."}], Sampling(max_tokens=24))["figures"]
    print(f"reference, a plain Ask now: decode {ref.get('tokens_per_s') or 0:.1f} tokens/s, prompt "
          f"{ref['prompt_tokens'] / max(ref['prompt_eval_s'], 1e-9):.0f} tokens/s")

    every = a.every or max(len(TYPED) // a.pauses, 1)
    for where, suffix in (("at the end of a cell (no suffix)", ""), ("mid-cell (the code below is the suffix)",
                                                                      SUFFIX)):
        run(engine, count, where, suffix, every, a)
    ask_during(engine)
    engine.close()
    print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
          f"| cores: {os.cpu_count()}")


def ask_during(engine, n: int = 5) -> None:
    """Time to first token of fresh Asks, alone and started while a completion decodes (it stops within a token)."""
    completer = engine.backend.ghost()
    alone, during, gave_way = [], [], []
    for i in range(n):
        def msgs(tag):
            return [{"role": "user", "content": f"[{tag} {i}] Write a Python function that reverses a string."}]
        alone.append(engine.generate(msgs("alone"), Sampling(max_tokens=4))["figures"]["ttft_s"])
        running, out = threading.Event(), {}
        worker = threading.Thread(target=lambda: out.update(res=completer.complete(
            ABOVE + TYPED, "", max_tokens=200, scope="none", should_stop=lambda: engine.busy or engine.queue_depth > 0,
            on_token=lambda text: running.set())))
        worker.start()
        running.wait(60)
        during.append(engine.generate(msgs("during"), Sampling(max_tokens=4))["figures"]["ttft_s"])
        worker.join()
        gave_way.append(out["res"].finish == "cancelled")
    print(f"\nAsk time to first token: alone p50 {statistics.median(alone) * 1000:.0f} ms; started during a completion "
          f"p50 {statistics.median(during) * 1000:.0f} ms; the completion gave way {sum(gave_way)} of {n} times")


def run(engine, count, where: str, suffix: str, every: int, a) -> None:
    cold = ghost_complete(engine, ABOVE, suffix, max_tokens=a.max_tokens)
    print(f"\n== typing {where}; mode {cold.mode}; a first completion there read {cold.evaluated_prompt_tokens} "
          f"prompt tokens in {cold.total_s * 1000:.0f} ms")
    total, first, evaluated, bounds, words = [], [], [], [], []
    done = 0
    for n in range(1, a.pauses + 1):
        upto = min(n * every, len(TYPED))
        typed = TYPED[done:upto]
        res = ghost_complete(engine, ABOVE + TYPED[:upto], suffix, max_tokens=a.max_tokens)
        done = upto
        if res.status != "ok":
            print(f"pause {n}: {res.status} {res.message}")
            continue
        total.append(res.total_s)
        first.append(res.ttft_s or res.total_s)
        evaluated.append(res.evaluated_prompt_tokens)
        bounds.append(count(typed) + res.suffix_tokens + 32)
        words.append(res.completion_tokens)
        if upto >= len(TYPED):
            break
    over = sum(e > b for e, b in zip(evaluated, bounds))
    print(f"{len(total)} completions, a pause every {every} characters typed, max_tokens {a.max_tokens}")
    print(f"request to suggestion: p50 {statistics.median(total) * 1000:.0f} ms, p95 {pct(total, 0.95) * 1000:.0f} "
          f"ms, max {max(total) * 1000:.0f} ms")
    print(f"request to first token: p50 {statistics.median(first) * 1000:.0f} ms, p95 {pct(first, 0.95) * 1000:.0f} ms")
    print(f"prompt tokens read per completion: p50 {statistics.median(evaluated):.0f}, max {max(evaluated)} "
          f"(prompts of {cold.prompt_tokens} to {cold.prompt_tokens + count(TYPED)} tokens); over the bound "
          f"(typed as tokens + suffix + 32): {over} of {len(evaluated)}")
    print(f"tokens per suggestion: p50 {statistics.median(words):.0f}, max {max(words)}")
    print("read per completion:", evaluated)


if __name__ == "__main__":
    main()
