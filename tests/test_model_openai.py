"""The OpenAI-compatible backend against a real `python -m llama_cpp.server` on loopback."""
from __future__ import annotations

import http.server
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from local_model import Engine, ModelError, Sampling, load_backend
from parts import smollm2_path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# llama_cpp.server, with the CPU buffer policy Loopbook's own backend follows (local_model.cpu_buffers):
# on a VM that advertises AMX without granting it, the stock server dies at its first request.
SERVE = """
import contextlib, runpy, sys
sys.path.insert(0, {root!r})
from local_model.backends.llama import no_extra_buffers
from local_model.cpu_buffers import extra_buffers
sys.argv[0] = "llama_cpp.server"
with contextlib.nullcontext() if extra_buffers()[0] else no_extra_buffers():
    runpy.run_module("llama_cpp.server", run_name="__main__")
""".format(root=str(Path(__file__).resolve().parent.parent))


@pytest.fixture(scope="module")
def server_url(tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", SERVE, "--model", str(smollm2_path()),
             "--port", str(port), "--host", "127.0.0.1", "--n_ctx", "2048",
             "--interrupt_requests", "False"],  # its default drops a streaming reply when the next request comes
            stdout=out, stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"llama_cpp.server did not start:\n{log.read_text()[-2000:]}")
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


class Junk(http.server.BaseHTTPRequestHandler):
    """Answers every request with 200 and something that is not an OpenAI response."""

    def _junk(self):
        n = int(self.headers.get("Content-Length") or 0)
        if n:
            self.rfile.read(n)
        body = b"<html><body>surprise! not an API</body></html>\n"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _junk

    def log_message(self, *args):
        pass


@pytest.fixture
def junk_url():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Junk)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()
    srv.server_close()


MSGS = [{"role": "user", "content": "Name three colours."}]


def test_streams_from_llama_cpp_server(server_url):
    b = load_backend(backend="openai", base_url=server_url)  # bare host: /v1 is added
    assert b.manifest["backend"] == "openai" and b.manifest["model"]
    assert b.base_url.endswith("/v1")
    events = list(b.stream(MSGS, Sampling(max_tokens=12)))
    tokens = [e for e in events if e["type"] == "token"]
    done = events[-1]
    assert tokens and done["type"] == "done"
    assert done["text"] == "".join(e["text"] for e in tokens)
    assert done["finish_reason"] == "length"
    f = done["figures"]
    assert f["completion_tokens"] >= 1 and f["prompt_tokens"] > 0 and f["ttft_s"] > 0
    assert "cached_prompt_tokens" in f and "tokens_per_s" in f


def test_same_text_as_the_embedded_backend_at_temperature_zero(server_url, tmp_path):
    remote = load_backend(backend="openai", base_url=server_url + "/v1")
    local = load_backend("smollm2-135m", data_dir=tmp_path)
    try:
        a = list(remote.stream(MSGS, Sampling(max_tokens=10)))[-1]["text"]
        b = list(local.stream(MSGS, Sampling(max_tokens=10)))[-1]["text"]
        assert a == b
    finally:
        local.close()


def test_engine_over_the_remote_backend(server_url):
    engine = Engine(load_backend(backend="openai", base_url=server_url))
    try:
        done = engine.generate(MSGS, Sampling(max_tokens=5, top_k=40, repeat_penalty=1.1))
        assert done["type"] == "done" and done["text"]
    finally:
        engine.close()


def test_server_down_is_a_clear_error():
    url = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(ModelError) as e:
        load_backend(backend="openai", base_url=url)
    assert "cannot reach" in str(e.value) and url in str(e.value)
    # With the model named, the failure comes at the request instead.
    b = load_backend(backend="openai", base_url=url, model="whatever")
    with pytest.raises(ModelError) as e:
        list(b.stream(MSGS, Sampling(max_tokens=4)))
    assert "is it running" in str(e.value)


def test_garbage_answers_are_a_clear_error(junk_url):
    with pytest.raises(ModelError) as e:
        load_backend(backend="openai", base_url=junk_url)
    assert "not an OpenAI-compatible" in str(e.value)
    b = load_backend(backend="openai", base_url=junk_url, model="m")
    with pytest.raises(ModelError) as e:
        list(b.stream(MSGS, Sampling(max_tokens=4)))
    assert "OpenAI" in str(e.value)


def test_k_candidates_go_to_the_server_together(server_url):
    b = load_backend(backend="openai", base_url=server_url)
    samplings = [Sampling(max_tokens=6), Sampling(max_tokens=6, temperature=0.9, seed=2)]
    events = list(b.stream_many(MSGS, samplings))
    done = {ev["seq"]: ev for ev in events if ev["type"] == "done"}
    assert sorted(done) == [0, 1] and done[0]["text"], done
    assert all(ev["finish_reason"] in ("stop", "length") and "error" not in ev for ev in done.values()), done
    for seq in (0, 1):
        assert done[seq]["text"] == "".join(ev["text"] for ev in events if ev["type"] == "token" and ev["seq"] == seq)


def test_a_candidate_with_its_own_prompt_is_its_own_request(server_url):
    b = load_backend(backend="openai", base_url=server_url)
    greedy = Sampling(max_tokens=8)
    other = [{"role": "user", "content": "Say hello in French."}]
    alone = {ev["seq"]: ev for ev in b.stream_many(other, [greedy]) if ev["type"] == "done"}[0]
    done = {ev["seq"]: ev for ev in b.stream_many(MSGS, [greedy, greedy], seq_messages=[None, other])
            if ev["type"] == "done"}
    assert done[1]["text"] == alone["text"] != done[0]["text"]  # each request alone on the server: same text
    assert done[1]["figures"]["prompt_tokens"] == alone["figures"]["prompt_tokens"]


def test_ghost_text_is_unsupported_through_a_remote_backend_and_says_so(server_url):
    from local_model.ghost import ghost_complete

    engine = Engine(load_backend(backend="openai", base_url=server_url))
    try:
        res = ghost_complete(engine, "def add(a, b):\n    return ", "")
        assert res.status == "unsupported" and res.text == ""
        assert "openai backend has no completion at the cursor" in res.message
    finally:
        engine.close()
