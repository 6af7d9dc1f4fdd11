"""Load on loopback: N clients mixing reads, edits, runs and SSE streams against one real Loopbook server.

Bounded in time and count (it stops at --seconds or --max-requests, whichever comes first). It ends by
checking that every acknowledged write is in the store, and prints p50/p99 latency per kind of request,
the generation queue depth it saw, and any errors. Exit status 1 on an error or a lost write.

Run from the checkout:
    .venv/bin/python bench/bench_load.py [--clients 20] [--seconds 60] [--model smollm2-135m]
    .venv/bin/python bench/bench_load.py --base http://127.0.0.1:5001 --token TOKEN   # a running server
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
# What a client does, with weights: mostly reads and edits, as a person does.
MIX = {"read": 32, "page": 8, "edit": 24, "add_cell": 5, "contend": 5, "run": 18, "ask_sse": 4, "page_stream": 4}
GENERATION_TIMEOUT_S = 900  # a reply waits its turn in the model's queue: slow under load, not an error


@dataclass
class Tally:
    latencies: dict[str, list[float]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    conflicts: int = 0  # a stale version refused with 409: the loser is told, which is what should happen
    generations: list[dict] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def took(self, kind: str, seconds: float) -> None:
        with self.lock:
            self.latencies.setdefault(kind, []).append(seconds)

    def error(self, what: str) -> None:
        with self.lock:
            self.errors.append(what)


class Client:
    """One simulated person: their own dialog and cells, plus the shared ones everyone works on."""

    def __init__(self, n: int, base: str, token: str, shared: dict, tally: Tally, seed: int):
        self.n, self.shared, self.tally = n, shared, tally
        self.rng = random.Random(seed)
        self.http = httpx.Client(base_url=base, headers={"Authorization": f"token {token}"}, timeout=120)
        self.acked: dict[int, str] = {}  # cell id -> the last source the server acknowledged
        self.versions: dict[int, int] = {}
        self.contended: list[tuple[int, str]] = []  # (version, source) of our acknowledged shared edits
        self.did = self.call("setup", "POST", "/api/dialogs", json={"title": f"client {n}"}).json()["id"]
        # Short replies, for the page's Ask too (it takes the dialog's settings): the load is in the queue.
        self.call("setup", "PATCH", f"/api/dialogs/{self.did}", json={"settings": {"max_tokens": 12}})
        for i in range(3):
            self.new_cell(f"# client {n} cell {i}")
        self.prompt = self.call("setup", "POST", f"/api/dialogs/{self.did}/messages",
                                json={"type": "prompt", "source": "Say hello in five words."}).json()["id"]
        self.count = 0

    def call(self, kind: str, method: str, url: str, ok=(200,), **kw) -> httpx.Response:
        t0 = time.perf_counter()
        r = self.http.request(method, url, **kw)
        self.tally.took(kind, time.perf_counter() - t0)
        if r.status_code not in ok:
            self.tally.error(f"{kind}: {method} {url} -> {r.status_code} {r.text[:200]}")
        return r

    def new_cell(self, source: str) -> None:
        r = self.call("new_cell", "POST", f"/api/dialogs/{self.did}/messages", json={"type": "code", "source": source})
        if r.status_code == 200:
            self.acked[r.json()["id"]] = source
            self.versions[r.json()["id"]] = r.json()["version"]

    def step(self) -> None:
        self.count += 1
        kinds = list(MIX)
        if self.count <= len(kinds):  # every kind once first (each client in its own order), then at random
            kind = kinds[(self.n + self.count) % len(kinds)]
        else:
            kind = self.rng.choices(kinds, weights=list(MIX.values()))[0]
        getattr(self, kind)()

    def add_cell(self) -> None:
        self.new_cell(f"# client {self.n} new cell {self.count}")

    def read(self) -> None:
        url = self.rng.choice([f"/api/dialogs/{self.did}", "/api/dialogs", "/api/model",
                               f"/api/dialogs/{self.rng.choice(self.shared['run_dialogs'])}"])
        self.call("read", "GET", url)

    def page(self) -> None:
        self.call("page", "GET", f"/d/{self.rng.choice([self.did, *self.shared['run_dialogs']])}")

    def edit(self) -> None:
        cell = self.rng.choice(list(self.acked))
        source = f"# client {self.n} edit {self.count}"
        r = self.call("edit", "PATCH", f"/api/messages/{cell}", json={"source": source, "version": self.versions[cell]})
        if r.status_code == 200:
            self.acked[cell], self.versions[cell] = source, r.json()["version"]

    def contend(self) -> None:
        cell = self.shared["contended"]
        v = self.call("contend", "GET", f"/api/messages/{cell}").json()["version"]
        source = f"# client {self.n} wins {self.count}"
        r = self.call("contend", "PATCH", f"/api/messages/{cell}", ok=(200, 409), json={"source": source, "version": v})
        if r.status_code == 200:
            self.contended.append((r.json()["version"], source))
        else:
            with self.tally.lock:
                self.tally.conflicts += 1

    def run(self) -> None:
        cell = self.rng.choice(self.shared["run_cells"])
        r = self.call("run", "POST", f"/api/messages/{cell}/run")
        if r.status_code == 200 and r.json()["status"] != "ok":
            self.tally.error(f"run: cell {cell} -> {r.json()['status']} {r.json().get('message')}")

    def ask_sse(self) -> None:
        if not self.shared["model"]:
            return self.read()
        t0 = time.perf_counter()
        done = None
        with self.http.stream("POST", f"/api/messages/{self.prompt}/ask", json={"max_tokens": 12},
                              headers={"Accept": "text/event-stream"}, timeout=GENERATION_TIMEOUT_S) as r:
            if r.status_code != 200:
                self.tally.error(f"ask_sse: {r.status_code} {r.read()[:200]!r}")
                return
            event = None
            for line in r.iter_lines():
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: ") and event == "done":
                    done = json.loads(line[6:])
        self.tally.took("ask_sse", time.perf_counter() - t0)
        if not done or done["status"] != "done":
            self.tally.error(f"ask_sse: ended without a done event: {done}")
        else:
            with self.tally.lock:
                self.tally.generations.append(done["figures"])

    def page_stream(self) -> None:
        """The page's way: POST /cells/{id}/ask answers with the streaming cell, then GET its SSE stream."""
        if not self.shared["model"]:
            return self.page()
        t0 = time.perf_counter()
        r = self.call("page_stream_start", "POST", f"/cells/{self.prompt}/ask", headers={"HX-Request": "true"})
        if r.status_code != 200 or "sse-connect" not in r.text:
            self.tally.error(f"page_stream: no stream in {r.text[:200]}")
            return
        with self.http.stream("GET", f"/cells/{self.prompt}/stream", timeout=GENERATION_TIMEOUT_S) as s:
            text = "".join(s.iter_text())
        self.tally.took("page_stream", time.perf_counter() - t0)
        if "event: done" not in text:
            self.tally.error("page_stream: no done event")

    def verify(self) -> list[str]:
        """Every write the server acknowledged to this client is in the store."""
        lost = []
        for cell, source in self.acked.items():
            r = self.http.get(f"/api/messages/{cell}")
            if r.status_code != 200 or r.json()["source"] != source:
                lost.append(f"cell {cell}: acknowledged {source!r}, store has "
                            f"{r.json().get('source') if r.status_code == 200 else r.status_code!r}")
        return lost


def percentile(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def run_load(base: str, token: str, *, clients: int = 20, seconds: float = 60.0, max_requests: int = 200_000,
             model: bool = True, seed: int = 1) -> dict:
    """Drive the server; return the figures (see main for what they mean)."""
    tally = Tally()
    admin = httpx.Client(base_url=base, headers={"Authorization": f"token {token}"}, timeout=120)
    shared = {"model": model, "run_dialogs": [], "run_cells": []}
    for i in range(4):  # four kernels shared by everyone: runs queue per kernel, as in a real team
        did = admin.post("/api/dialogs", json={"title": f"shared run {i}"}).json()["id"]
        shared["run_dialogs"].append(did)
        cell = admin.post(f"/api/dialogs/{did}/messages", json={"type": "code", "source": "print(sum(range(1000)))"})
        shared["run_cells"].append(cell.json()["id"])
        admin.post(f"/api/messages/{shared['run_cells'][-1]}/run")  # start the kernel before the clock starts
    did = admin.post("/api/dialogs", json={"title": "contended"}).json()["id"]
    shared["contended"] = admin.post(f"/api/dialogs/{did}/messages", json={"source": "# everyone edits me"}).json()["id"]
    start_version = admin.get(f"/api/messages/{shared['contended']}").json()["version"]
    people = [Client(n, base, token, shared, tally, seed + n) for n in range(clients)]

    deadline = time.monotonic() + seconds
    sent = [0]
    depth = {"max": 0, "samples": 0, "busy_samples": 0}
    stop = threading.Event()

    def monitor():
        while not stop.is_set():
            st = admin.get("/api/model").json()
            depth["samples"] += 1
            depth["max"] = max(depth["max"], st.get("queue_depth") or 0)
            depth["busy_samples"] += bool(st.get("busy"))
            stop.wait(0.1)

    def work(person: Client):
        # Every kind once even past the deadline (a count bound), so a short run still covers them all.
        while person.count < len(MIX) or (time.monotonic() < deadline and sent[0] < max_requests):
            sent[0] += 1
            try:
                person.step()
            except Exception as e:  # noqa: BLE001 - a load test counts every failure, whatever it is
                tally.error(f"client {person.n}: {type(e).__name__}: {e}")

    watcher = threading.Thread(target=monitor, daemon=True)
    watcher.start()
    t0 = time.monotonic()
    threads = [threading.Thread(target=work, args=(p,)) for p in people]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t0
    stop.set()
    watcher.join()

    lost = [x for p in people for x in p.verify()]
    wins = sorted(x for p in people for x in p.contended)
    final = admin.get(f"/api/messages/{shared['contended']}").json()
    if [v for v, _ in wins] != list(range(start_version + 1, start_version + 1 + len(wins))):
        lost.append(f"contended cell: acknowledged versions {[v for v, _ in wins][:20]} are not one per write")
    if wins and final["source"] != wins[-1][1]:
        lost.append(f"contended cell: store has {final['source']!r}, the last acknowledged write was {wins[-1][1]!r}")
    for p in people:
        p.http.close()
    admin.close()
    quick = [x for k, v in tally.latencies.items() if k not in ("ask_sse", "page_stream", "setup") for x in v]
    gen_time = sum(g.get("total_s") or 0 for g in tally.generations)
    waits = [g.get("queue_s") or 0 for g in tally.generations]
    gens = [g.get("total_s") or 0 for g in tally.generations]
    return {
        "clients": clients, "seconds": round(elapsed, 1), "requests": sum(len(v) for v in tally.latencies.values()),
        "errors": tally.errors, "lost_writes": lost, "conflicts_told": tally.conflicts,
        "acknowledged_writes": sum(len(p.acked) for p in people) + len(wins),
        "p50_ms": round(1000 * percentile(quick, 50), 1) if quick else None,
        "p99_ms": round(1000 * percentile(quick, 99), 1) if quick else None,
        "by_kind": {k: {"n": len(v), "p50_ms": round(1000 * percentile(v, 50), 1),
                        "p99_ms": round(1000 * percentile(v, 99), 1)} for k, v in sorted(tally.latencies.items())},
        "generations": len(tally.generations), "generation_s": round(gen_time, 2),
        "max_queue_depth": depth["max"], "busy_share": round(depth["busy_samples"] / max(depth["samples"], 1), 2),
        "queue_wait_p50_s": round(percentile(waits, 50), 2) if waits else None,
        "queue_wait_p99_s": round(percentile(waits, 99), 2) if waits else None,
        "generation_p50_s": round(percentile(gens, 50), 2) if gens else None,
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(data_dir: Path, token: str, model: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--port", str(port), "--data-dir", str(data_dir),
                             "--model", model, "--exec-timeout", "30"], cwd=ROOT,
                            env={**os.environ, "LOOPBOOK_TOKEN": token}, stdout=subprocess.DEVNULL,
                            stderr=open(data_dir / "server.log", "ab"))
    base = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            st = httpx.get(base + "/api/model", headers={"Authorization": f"token {token}"}, timeout=2)
            if st.status_code == 200 and st.json()["state"] != "loading":
                return proc, base
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"the server did not start; see {data_dir / 'server.log'}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--max-requests", type=int, default=200_000)
    ap.add_argument("--model", default="smollm2-135m", help="the model the started server loads ('none': no model)")
    ap.add_argument("--base", help="a running server's URL (loopback) instead of starting one")
    ap.add_argument("--token", help="that server's token")
    args = ap.parse_args()
    proc = None
    if args.base:
        if not args.token:
            ap.error("--base needs --token")
        base, token = args.base, args.token
    else:
        token = "bench-load-token"
        tmp = Path(tempfile.mkdtemp(prefix="lb-bench-load-"))
        proc, base = start_server(tmp, token, args.model if args.model != "none" else "/no/model.gguf")
        print(f"server at {base}, data in {tmp}")
    try:
        with_model = httpx.get(base + "/api/model", headers={"Authorization": f"token {token}"}).json()["state"] == "ready"
        out = run_load(base, token, clients=args.clients, seconds=args.seconds, max_requests=args.max_requests,
                       model=with_model)
    finally:
        if proc:
            proc.terminate()
            proc.wait(30)
    print(f"{out['clients']} clients for {out['seconds']} s: {out['requests']} requests, "
          f"{out['requests'] / out['seconds']:.0f}/s")
    print(f"latency (reads, edits, runs): p50 {out['p50_ms']} ms, p99 {out['p99_ms']} ms")
    print(f"{'kind':<18}{'n':>7}{'p50 ms':>10}{'p99 ms':>10}")
    for kind, f in out["by_kind"].items():
        print(f"{kind:<18}{f['n']:>7}{f['p50_ms']:>10}{f['p99_ms']:>10}")
    print(f"generations: {out['generations']} ({out['generation_s']} s of model time in {out['seconds']} s: "
          f"one at a time), max queue depth seen {out['max_queue_depth']}, model busy {out['busy_share']:.0%}")
    if out["generations"]:
        print(f"per reply: {out['generation_p50_s']} s generating (p50), queue wait p50 {out['queue_wait_p50_s']} s, "
              f"p99 {out['queue_wait_p99_s']} s")
    print(f"acknowledged writes: {out['acknowledged_writes']}, lost: {len(out['lost_writes'])}, "
          f"stale edits refused with 409 (losers told): {out['conflicts_told']}")
    print(f"errors: {len(out['errors'])}")
    for e in out["errors"][:20] + out["lost_writes"][:20]:
        print("  ", e)
    return 1 if out["errors"] or out["lost_writes"] else 0


if __name__ == "__main__":
    sys.exit(main())
