"""The notebook page's speed, side by side: a 1,000-cell dialog rendered by the server, and a one-cell run
swap against a whole page.

Starts the real app (tests/apphelpers.py Server, no model) on loopback, imports a generated notebook of
`--cells` cells (code with outputs, notes, prompts with replies, some of them long or coloured), then times:
  - GET /d/{id}: the full page, median of `--repeat` requests (the server renders every cell);
  - POST /cells/{id}/run: what the browser swaps after a run (one cell), median of `--repeat`;
  - GET /cells/{id}/output/0: the "show all" fetch of a collapsed output.

Run from the checkout: .venv/bin/python bench/bench_page.py [--cells 1000] [--repeat 7]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from apphelpers import Server  # noqa: E402
from dialog.notebook import prompt_markdown  # noqa: E402


def notebook(n: int) -> dict:
    """A notebook that looks like real work: mostly code with outputs, some notes and prompts."""
    cells = []
    for i in range(n):
        kind = i % 10
        if kind in (0, 5):
            cells.append({"cell_type": "markdown", "metadata": {}, "id": f"c{i}",
                          "source": f"## Step {i}\n\nWe look at **item {i}** and `x_{i}`:\n\n- one\n- two\n"})
        elif kind == 7:
            prompt = f"Why does step {i} fail?"
            reply = f"Because `x_{i}` is None.\n\n```python\nx_{i} = compute({i})\n```\n"
            cells.append({"cell_type": "markdown", "id": f"c{i}",
                          "metadata": {"loopbook": {"type": "prompt", "prompt": prompt, "reply": reply}},
                          "source": prompt_markdown(prompt, reply)})
        else:
            outputs = [{"output_type": "stream", "name": "stdout", "text": f"value {i}: {i * i}\n"}]
            if kind == 3:
                outputs.append({"output_type": "execute_result", "execution_count": i, "metadata": {},
                                "data": {"text/plain": f"[{', '.join(str(j) for j in range(20))}]"}})
            if kind == 9:
                outputs.append({"output_type": "error", "ename": "ValueError", "evalue": f"bad {i}",
                                "traceback": ["\x1b[0;31mValueError\x1b[0m: bad", "  line 1", "  line 2"]})
            if i % 100 == 1:
                outputs.append({"output_type": "stream", "name": "stdout",
                                "text": "".join(f"line {j}\n" for j in range(500))})
            cells.append({"cell_type": "code", "execution_count": i, "metadata": {}, "id": f"c{i}",
                          "source": f"import math\nx_{i} = math.sqrt({i})\nprint('value', {i})",
                          "outputs": outputs})
    return {"nbformat": 4, "nbformat_minor": 5, "cells": cells,
            "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}}


def timed(fn, repeat: int) -> tuple[float, int]:
    times, size = [], 0
    for _ in range(repeat):
        t0 = time.perf_counter()
        r = fn()
        times.append(time.perf_counter() - t0)
        r.raise_for_status()
        size = len(r.content)
    return statistics.median(times), size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="lb-bench-page-") as tmp:
        server = Server(Path(tmp), "--model", "/no/model/for/the/bench.gguf").start()
        try:
            with server.client(timeout=120) as c:
                nb = json.dumps(notebook(args.cells)).encode()
                did = c.post("/api/dialogs/import", content=nb, params={"title": "bench"}).json()["id"]
                msgs = c.get(f"/api/dialogs/{did}").json()["messages"]
                kinds = {t: sum(m["type"] == t for m in msgs) for t in ("code", "note", "prompt")}
                long_out = next(m for m in msgs if any(len(o.get("text", "")) > 4000 for o in m["outputs"]))
                code = next(m for m in msgs if m["type"] == "code" and m["id"] != long_out["id"])
                long_n = next(n for n, o in enumerate(long_out["outputs"]) if len(o.get("text", "")) > 4000)
                page_url = f"/d/{did}"
                t0 = time.perf_counter()
                c.get(page_url).raise_for_status()  # the first open renders every markdown text (cold caches)
                cold_s = time.perf_counter() - t0
                c.post(f"/cells/{code['id']}/run").raise_for_status()  # start the kernel
                page_s, page_b = timed(lambda: c.get(page_url), args.repeat)
                run_s, run_b = timed(lambda: c.post(f"/cells/{code['id']}/run"), args.repeat)
                assert "line 499" in c.get(f"/cells/{long_out['id']}/output/{long_n}").text
                full_s, full_b = timed(lambda: c.get(f"/cells/{long_out['id']}/output/{long_n}"), args.repeat)
                empty = c.post("/api/dialogs", json={"title": "empty"}).json()["id"]
                empty_s, empty_b = timed(lambda: c.get(f"/d/{empty}"), args.repeat)
        finally:
            server.stop()
    print(f"{args.cells} cells: {kinds['code']} code, {kinds['note']} notes, {kinds['prompt']} prompts with replies")
    print(f"{'what':<44}{'median ms':>10}{'bytes':>12}")
    print(f"{'GET /d/{id}, ' + str(args.cells) + ' cells, first open':<44}{cold_s * 1e3:>10.1f}{page_b:>12,}")
    print(f"{'GET /d/{id}, ' + str(args.cells) + ' cells (full page)':<44}{page_s * 1e3:>10.1f}{page_b:>12,}")
    print(f"{'GET /d/{id}, empty dialog (page frame)':<44}{empty_s * 1e3:>10.1f}{empty_b:>12,}")
    print(f"{'POST /cells/{id}/run (one-cell swap)':<44}{run_s * 1e3:>10.1f}{run_b:>12,}")
    print(f"{'GET /cells/{id}/output/n (show all, 500 lines)':<44}{full_s * 1e3:>10.1f}{full_b:>12,}")
    print(f"per cell: {(page_s - empty_s) / args.cells * 1e3:.3f} ms, {(page_b - empty_b) / args.cells:,.0f} bytes")
    print(f"ratio full page / one-cell run swap: {page_b / max(run_b, 1):,.0f}x bytes, "
          f"{page_s / max(run_s, 1e-9):,.1f}x time (the run includes the kernel round trip)")
    print(f"budget: full page render {'within' if page_s < 0.3 else 'OVER'} 300 ms")


if __name__ == "__main__":
    main()
