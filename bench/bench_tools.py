"""What `$`name`` and `&`fn`` cost a prompt: reading values and tool specs from a real kernel, one tool call's round
trip, and a tool loop on a real model (each step's prompt tokens, how many came from the KV cache, its seconds).

Run from the checkout: .venv/bin/python bench/bench_tools.py [--n 50] [--model PATH] [--steps 3]
(the model defaults to SmolLM2-135M; its forced calls make the loop run exactly --steps steps, then stop).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from dialog import Store  # noqa: E402
from execfeedback.traces import TraceStore  # noqa: E402
from execfeedback.workspace.ask import KernelAccess, ask  # noqa: E402
from kernels import KernelPool  # noqa: E402
from kernels.namespace import call_tool, tool_specs, variables  # noqa: E402
from local_model import Engine, Sampling, load_backend  # noqa: E402

KEY = "bench-tools"
SETUP = '''
import pandas as pd, numpy as np
df = pd.DataFrame(np.random.default_rng(0).normal(size=(100_000, 8)), columns=list("abcdefgh"))
def scale(n: int) -> int:
    """Multiply n by ten."""
    return n * 10
'''


def ms(xs: list[float]) -> str:
    xs = sorted(xs)
    return f"p50 {statistics.median(xs) * 1000:.1f} ms, p90 {xs[int(len(xs) * 0.9) - 1] * 1000:.1f} ms"


async def timed(n: int, make) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        await make()
        out.append(time.perf_counter() - t)
    return out


async def main(args) -> None:
    pool = KernelPool(spare=False)
    await pool.start()
    try:
        assert (await pool.execute(KEY, SETUP)).status == "ok"
        print(f"$`df` (100000x8 DataFrame) summary: {ms(await timed(args.n, lambda: variables(pool, KEY, ['df'])))}")
        print(f"&`scale` spec: {ms(await timed(args.n, lambda: tool_specs(pool, KEY, ['scale'])))}")
        print(f"scale(n=3) call: {ms(await timed(args.n, lambda: call_tool(pool, KEY, 'scale', {'n': 3})))}")

        engine = Engine(load_backend(args.model, n_ctx=4096))
        with tempfile.TemporaryDirectory() as tmp:
            store = Store(Path(tmp))
            d = store.create_dialog("bench")
            m = store.add_message(d["id"], "prompt", "Look at $`df`, then use &`scale` on 3.")
            call = "<tool_call>\n" + json.dumps({"name": "scale", "arguments": {"n": 3}}) + "\n</tool_call>"

            async def key():
                return KEY
            t = time.perf_counter()
            res = await ask(store, engine, m["id"], kernel=KernelAccess(pool, key), tool_steps=args.steps,
                            sampling=Sampling(max_tokens=40, grammar=f"root ::= {json.dumps(call)}\n"))
            total = time.perf_counter() - t
            steps = TraceStore(store).tool_steps(message_id=m["id"])
            print(f"tool loop on {engine.manifest['model']}: {len(steps)} model turns, "
                  f"{res.figures['tool_calls']} calls, {total:.2f} s in all")
            for s in steps:
                print(f"  step {s['step']}: {s['prompt_tokens']} prompt tokens, {s['cached_prompt_tokens']} from the "
                      f"KV cache, calls {[c['status'] for c in s['calls']]}")
            store.close()
        engine.close()
    finally:
        await pool.shutdown_all()


if __name__ == "__main__":
    from parts import smollm2_path

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=50, help="repetitions of each kernel request")
    p.add_argument("--model", default=None, help="a GGUF path or model name (default: SmolLM2-135M)")
    p.add_argument("--steps", type=int, default=3, help="tool_steps of the loop")
    a = p.parse_args()
    a.model = a.model or str(smollm2_path())
    asyncio.run(main(a))
