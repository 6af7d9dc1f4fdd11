"""Export speed and memory: fill a store with synthetic attempts, export every format, print the figures.

    .venv/bin/python bench/bench_export.py [--attempts 100000] [--small 25000] [--keep DIR]

Rows are written straight into SQLite (executemany) with sizes like real ones: a notebook or eval
context of 1-3 KB, replies of 0.3-1 KB with prose and a code block, tracebacks, feedback turns,
manifests and sampling per attempt. Each export runs as `python -m execfeedback export` in its own
process, so wall time includes start-up and the peak RSS (VmHWM, reported by the child itself) is that export's alone. The
small store shows whether memory grows with the data (it should not: rows stream).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dialog import Store  # noqa: E402
from dialog.context import DEFAULT_SYSTEM_PROMPT  # noqa: E402

WORDS = ("value item count total index result parts text line word chars digits score name key row col grid "
         "left right low high start end step size width height node edge path seen queue stack cache memo buf "
         "head tail prev curr nxt acc out data record entry field token unit price rate delta limit bound").split()
ERRORS = [("error", "NameError", "name '{v}' is not defined"), ("error", "TypeError", "unsupported operand type(s)"),
          ("error", "IndexError", "list index out of range"), ("error", "KeyError", "'{v}'"),
          ("check_failed", "AssertionError", "{f}([1, 2, 3]) returned 5, expected 6"),
          ("error", "ValueError", "invalid literal for int() with base 10: '{v}'"),
          ("syntax_error", "SyntaxError", "invalid syntax"), ("timeout", None, None), ("no_code", None, None)]
MANIFEST = json.dumps({"backend": "llama", "model": "qwen2.5-coder-1.5b", "file_name":
                       "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", "path": "/home/u/.loopbook/models/q.gguf",
                       "sha256": "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", "quant": "Q4_K_M",
                       "chat_template_hash": "9f" * 32, "llama_cpp_version": "0.3.36", "n_ctx": 8192,
                       "n_gpu_layers": 0, "flash_attn": False, "gpu": "none", "lora": None, "n_threads": 2})
SAMPLING = json.dumps({"temperature": 0.2, "top_p": 0.95, "top_k": 40, "min_p": 0.05, "repeat_penalty": 1.0,
                       "seed": 0, "max_tokens": 768})


def _name(rng: random.Random) -> str:
    return rng.choice(WORDS) + ("_" + rng.choice(WORDS) if rng.random() < 0.4 else "")


def code(rng: random.Random, fname: str) -> str:
    a, b, v, i = (_name(rng) for _ in range(4))
    lines = [f"def {fname}({a}, {b}=None):", f'    """Return the {v} of {a}, one pass."""', f"    {v} = []"]
    for _ in range(rng.randint(4, 14)):
        k = rng.randint(2, 9)
        lines.append(rng.choice([
            f"    for {i} in range(len({a})):", f"        if {a}[{i}] % {k} == {rng.randint(0, k - 1)}:",
            f"            {v}.append({a}[{i}] * {k})", f"    {b} = {b} or {{}}",
            f"    {v} = sorted({v}, key=lambda x: -x)[:{k}]  # keep the top {k}",
            f"    if not {a}:\n        return {v}", f"    {b}[{i!r}] = sum({v}) / max(1, len({v}))",
            f"    # {rng.choice(WORDS)} {rng.choice(WORDS)} {rng.choice(WORDS)}",
        ]))
    lines.append(f"    return {v}")
    return "\n".join(lines) + "\n"


def reply(rng: random.Random, body: str) -> str:
    prose = " ".join(rng.choice(WORDS) for _ in range(rng.randint(12, 40)))
    return f"Here is a version that handles the {prose[:60]} case.\n\n```python\n{body}```\n\n{prose.capitalize()}."


def feedback(rng: random.Random, status: str, ename: str | None, evalue: str | None, fname: str) -> str:
    if status == "timeout":
        head = "Your code ran longer than 10 s and was stopped. Look for a loop that never ends."
    elif status == "no_code":
        head = "Your reply had no code block."
    else:
        head = f"Your code raised {ename}: {evalue}"
    tb = "\n".join(f'  File "<solution>", line {rng.randint(2, 20)}, in {fname}\n    {_name(rng)} = {_name(rng)}[0]'
                   for _ in range(rng.randint(1, 4)))
    locs = ", ".join(f"{_name(rng)}={rng.randint(0, 999)}" for _ in range(rng.randint(2, 6)))
    return f"{head}\n\nTraceback (most recent call last):\n{tb}\n\nLocal values: {locs}\n\n" \
           "Return the whole corrected code in one ```python block."


_TASKS: dict[str, str] = {}


def context(rng: random.Random, fname: str, notebook: bool) -> list[dict]:
    if notebook:
        cells = []
        for _ in range(rng.randint(1, 4)):
            src = code(rng, _name(rng))
            cells.append(f"```python\n{src}```\nOutput:\n```\n{[rng.randint(0, 99) for _ in range(8)]}\n```")
        ask = f"Write {fname}(xs) that returns the " + " ".join(rng.choice(WORDS) for _ in range(20)) + "."
        return [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
                {"role": "user", "content": "\n\n".join(cells + [ask])}]
    if fname in _TASKS:  # an eval sends the same task text every time it meets the problem
        return [{"role": "system", "content": "You write Python functions."}, {"role": "user", "content": _TASKS[fname]}]
    task = _TASKS[fname] = (f"Write this Python function.\n\n```python\ndef {fname}(xs: list, k: int = 1) -> list:\n    \"\"\""
            + " ".join(rng.choice(WORDS) for _ in range(40)) + "\"\"\"\n```\n\nIt must pass these tests:\n\n```python\n"
            + "\n".join(f"assert {fname}({[rng.randint(0, 9) for _ in range(4)]}) == {rng.randint(0, 99)}"
                        for _ in range(3)) + "\n```\n\nReturn the whole code in one ```python block.")
    return [{"role": "system", "content": "You write Python functions."}, {"role": "user", "content": task}]


def fill(data_dir: Path, n_attempts: int, seed: int = 0) -> dict:
    """A store with about n_attempts attempts; returns counts."""
    Store(data_dir).close()  # the schema, by the real migrations
    rng = random.Random(seed)
    _TASKS.clear()
    conn = sqlite3.connect(data_dir / "loopbook.db")
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=OFF")
    ts = "2025-06-01T12:00:00.000+00:00"
    n_dialogs, n_tasks = 400, 600
    conn.executemany("INSERT INTO dialogs (id, title, settings, created_at, updated_at) VALUES (?, ?, '{}', ?, ?)",
                     [(i, f"dialog {i}", ts, ts) for i in range(1, n_dialogs + 1)])
    conn.executemany("INSERT INTO eval_runs (id, name, config, status, summary, created_at) VALUES (?, ?, '{}', "
                     "'done', '{}', ?)", [(i, f"run-{i}", ts) for i in (1, 2, 3)])
    traces, attempts, blobs, edits = [], [], {}, []
    aid = tid = 0
    while aid < n_attempts:
        tid += 1
        notebook = rng.random() < 0.6
        fname = _name(rng) if notebook else f"task_{rng.randrange(n_tasks)}"
        ctx = context(rng, fname, notebook)
        kind = rng.random()
        if kind < 0.35:
            plan = [[True]]
        elif kind < 0.45:
            plan = [[False] * rng.randint(1, 3) + [True]]
        elif kind < 0.70:
            plan = [[False]] * rng.randint(1, 2) + [[True]]
        elif kind < 0.92:
            plan = [[False]] * 3
        else:
            plan = [[False] * 3, [False], [False]]
        messages = ctx
        final = None
        solved = any(any(r) for r in plan)
        for rnd, cands in enumerate(plan):
            body_hash = hashlib.sha256(json.dumps(messages, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
            blobs[body_hash] = json.dumps(messages, ensure_ascii=False)
            chain_text = chain_fb = None
            for c, ok in enumerate(cands):
                aid += 1
                body = code(rng, fname)
                text = reply(rng, body)
                if rng.random() < 0.001:
                    body += "API = 'sk-proj-" + "".join(rng.choice("abcdef0123456789") for _ in range(32)) + "'\n"
                if ok:
                    status, ename, evalue, fb = "ok", None, None, None
                else:
                    status, ename, evalue = rng.choice(ERRORS)
                    evalue = evalue.format(v=_name(rng), f=fname) if evalue else None
                    fb = feedback(rng, status, ename, evalue, fname)
                tb = json.dumps([f'  File "<solution>", line {rng.randint(2, 20)}, in {fname}', f"{ename}: {evalue}"]
                                if ename else [])
                out = " ".join(str(rng.randint(0, 999)) for _ in range(rng.randint(0, 60)))
                attempts.append((aid, tid, rnd, c, None if notebook else fname, body_hash, text, "stop", body, 1,
                                 status, int(ok), ename, evalue, tb, out, "", len(out), 0, 0,
                                 json.dumps({"passed": 2 if ok else 1, "total": 2}), fb, 0.2, 0.5, 1.8, 24.0,
                                 0.01, 600 + 300 * rnd, 500 + 300 * rnd, 180, MANIFEST, SAMPLING, "model", ts))
                if ok:
                    final = aid
                elif chain_text is None:
                    chain_text, chain_fb = text, fb
            if final is None and rnd + 1 < len(plan):
                messages = messages + [{"role": "assistant", "content": chain_text},
                                       {"role": "user", "content": chain_fb}]
        traces.append((tid, "solve" if notebook else "eval", rng.randint(1, n_dialogs) if notebook else None,
                       None if notebook else fname, None if notebook else "bench", None if notebook else rng.randint(1, 3),
                       "passed" if solved else "failed", "passed" if solved else "budget", len(plan) - 1,
                       sum(len(r) for r in plan), final or aid, "qwen2.5-coder-1.5b", "llama", MANIFEST, SAMPLING,
                       ts, ts))
        if notebook and solved and rng.random() < 0.03:
            edits.append((tid, tid, final, "def f(x):\n    return x\n", f"def f(x):\n    return x + {tid}\n", ts))
    conn.executemany("INSERT INTO traces (id, kind, dialog_id, task_id, task_source, eval_run_id, status, stop_reason,"
                     " rounds, n_attempts, final_attempt_id, model, backend, manifest, sampling, created_at, finished_at)"
                     " VALUES (" + ", ".join("?" * 17) + ")", traces)
    conn.executemany("INSERT INTO blobs (hash, body) VALUES (?, ?)", blobs.items())
    conn.executemany("INSERT INTO attempts (id, trace_id, round, candidate, task_id, input_hash, completion,"
                     " finish_reason, code, extracted, exec_status, passed, ename, evalue, traceback, stdout, stderr,"
                     " stdout_chars, stderr_chars, truncated, checks, feedback, ttft_s, prompt_eval_s, decode_s,"
                     " tokens_per_s, exec_s, prompt_tokens, cached_prompt_tokens, completion_tokens, manifest,"
                     " sampling, author, created_at) VALUES (" + ", ".join("?" * 34) + ")", attempts)
    conn.executemany("INSERT INTO edits (message_id, trace_id, attempt_id, before, after, created_at) VALUES "
                     "(?, ?, ?, ?, ?, ?)", edits)
    conn.commit()
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    size = (data_dir / "loopbook.db").stat().st_size
    return {"attempts": aid, "traces": tid, "blobs": len(blobs), "edits": len(edits), "db_mb": size / 2 ** 20}


# The child reports its own high-water mark (VmHWM): rusage maxrss would include this bench's memory,
# which Linux carries over fork and exec.
WRAPPER = ("import resource, sys\n{body}\n"
           "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]\n"
           "u, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)\n"
           "print('VmHWM', hwm, u.ru_utime + u.ru_stime + c.ru_utime + c.ru_stime, file=sys.stderr)\nsys.exit(rc)")


def _run(body: str, *args: str) -> tuple[float, float, str, float]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", WRAPPER.format(body=body), *args], cwd=ROOT, capture_output=True,
                          text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    hwm, cpu = next(line.split()[1:] for line in proc.stderr.splitlines() if line.startswith("VmHWM"))
    return wall, int(hwm) / 1024, proc.stdout, float(cpu)


def run_export(data_dir: Path, out: Path, fmt: str, *extra: str) -> dict:
    """One CLI export in its own process (default --workers: one per core): wall s, CPU s, peak RSS MiB, rows."""
    wall, rss, stdout, cpu = _run("from execfeedback.__main__ import main\nrc = main(sys.argv[1:])", "export",
                                  "--data-dir", str(data_dir), "--out", str(out), "--format", fmt, "--quiet", *extra)
    rows = sum(int(line.split()[-2]) for line in stdout.splitlines() if line.strip().endswith(" rows"))
    return {"wall": wall, "rss": rss, "rows": rows, "cpu": cpu}


def baseline() -> tuple[float, float]:
    """Start-up alone: the CLI's imports, no export (wall s, peak RSS MiB)."""
    wall, rss, _, _ = _run("from execfeedback.__main__ import build_parser, _skip_pandas_in_sqlite_utils\n"
                           "_skip_pandas_in_sqlite_utils()\nbuild_parser()\nimport execfeedback.export.exporter, tqdm\nrc = 0")
    return wall, rss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--attempts", type=int, default=100_000)
    ap.add_argument("--small", type=int, default=25_000, help="a second, smaller store for the memory ratio (0: skip)")
    ap.add_argument("--keep", help="keep the stores and exports in this directory (a store already there is reused)")
    ap.add_argument("--repeat", type=int, default=3, help="runs of the sft export; the fastest is reported "
                    "(the machine is shared: other work slows single runs)")
    args = ap.parse_args()
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-export-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        sizes = [args.attempts] + ([args.small] if args.small else [])
        stores = {}
        for n in sizes:
            t0 = time.perf_counter()
            cached = work / f"store-{n}" / "info.json"
            if cached.exists():
                stores[n] = info = json.loads(cached.read_text())
                print(f"reusing store-{n}: {info['attempts']} attempts, {info['traces']} traces")
                continue
            info = fill(work / f"store-{n}", n)
            cached.write_text(json.dumps(info))
            stores[n] = info
            print(f"filled store-{n}: {info['attempts']} attempts, {info['traces']} traces, {info['blobs']} inputs, "
                  f"{info['edits']} edits, {info['db_mb']:.0f} MiB in {time.perf_counter() - t0:.1f} s")
        base_wall, base_rss = baseline()
        print(f"\nstart-up alone (python + the CLI's imports, nothing exported): {base_wall:.2f} s, peak RSS "
              f"{base_rss:.0f} MiB. Load average now: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (other "
              "work on the machine slows wall time; CPU s is this export's own time).\n")
        runs = [("sft", ()), ("sft_final", ()), ("preference", ()), ("kto", ()), ("trajectory", ()),
                ("corrections", ()), ("all", ()), ("all", ("--parquet",))]
        n = args.attempts
        print(f"{'format':<22}{'rows':>9}{'wall s':>9}{'CPU s':>8}{'rows/s':>10}{'attempts/s':>12}"
              f"{'peak RSS MiB':>14}")
        results = {}
        for fmt, extra in runs:
            label = fmt + (" --parquet" if extra else "")
            out = work / f"out-{n}-{label.replace(' ', '')}"
            tries = []
            for _ in range(args.repeat if fmt == "sft" else 1):
                shutil.rmtree(out, ignore_errors=True)
                tries.append(run_export(work / f"store-{n}", out, fmt, *extra))
            r = min(tries, key=lambda t: t["wall"])
            results[label] = r
            print(f"{label:<22}{r['rows']:>9}{r['wall']:>9.2f}{r['cpu']:>8.2f}{r['rows'] / r['wall']:>10.0f}"
                  f"{stores[n]['attempts'] / r['wall']:>12.0f}{r['rss']:>14.0f}")
        target = results["sft"]
        print(f"\nsft JSONL from {stores[n]['attempts']} attempts: {target['wall']:.2f} s wall, {target['cpu']:.2f} s "
              f"CPU (target < 10 s: {'met' if target['wall'] < 10 else 'missed'} on wall time)")
        if args.small:
            print(f"\nMemory against data size ({args.small} vs {n} attempts, side by side):")
            for fmt in ("sft", "all"):
                shutil.rmtree(work / f"out-{args.small}-{fmt}", ignore_errors=True)
                small = run_export(work / f"store-{args.small}", work / f"out-{args.small}-{fmt}", fmt)
                big = results[fmt]
                print(f"  {fmt:<6} peak RSS {small['rss']:.0f} MiB vs {big['rss']:.0f} MiB (ratio "
                      f"{big['rss'] / small['rss']:.2f} for {n / args.small:.0f}x the attempts); wall "
                      f"{small['wall']:.2f} s vs {big['wall']:.2f} s (ratio {big['wall'] / small['wall']:.2f})")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
