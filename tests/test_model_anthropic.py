"""The Anthropic backend through the real `anthropic` SDK, against a loopback stand-in server.

The stand-in speaks the Messages streaming format (server-sent events): message_start,
content_block_start, content_block_delta (text_delta), content_block_stop, message_delta with
usage, message_stop. Nothing here reaches Anthropic itself.
"""
from __future__ import annotations

import http.server
import json
import threading

import pytest

from local_model import Engine, ModelError, Sampling, load_backend

GOOD_KEY = "sk-ant-test-good"
REPLY = ["Hello", " from", " the", " stand", "-in", "."]


class StandIn(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    requests: list[dict] = []

    def log_message(self, *args):
        pass

    def _send_json(self, status, obj):
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path.split("?")[0] != "/v1/messages":
            return self._send_json(404, {"type": "error", "error": {"type": "not_found_error", "message": self.path}})
        auth = self.headers.get("Authorization", "")
        key = self.headers.get("x-api-key") or (auth[7:] if auth.startswith("Bearer ") else None)
        if key != GOOD_KEY:
            return self._send_json(401, {"type": "error", "error": {
                "type": "authentication_error", "message": "invalid x-api-key"}})
        StandIn.requests.append({"body": body, "headers": dict(self.headers)})
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()

        def sse(event, data):
            self.wfile.write(f"event: {event}\ndata: {json.dumps(data)}\n\n".encode())
            self.wfile.flush()

        reply = REPLY[: body["max_tokens"]]
        sse("message_start", {"type": "message_start", "message": {
            "id": "msg_standin", "type": "message", "role": "assistant", "model": body["model"],
            "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": 21, "output_tokens": 1, "cache_read_input_tokens": 100,
                      "cache_creation_input_tokens": 7}}})
        sse("content_block_start", {"type": "content_block_start", "index": 0,
                                    "content_block": {"type": "text", "text": ""}})
        sse("ping", {"type": "ping"})
        for piece in reply:
            sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                        "delta": {"type": "text_delta", "text": piece}})
        sse("content_block_stop", {"type": "content_block_stop", "index": 0})
        stop = "end_turn" if len(reply) == len(REPLY) else "max_tokens"
        sse("message_delta", {"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": None},
                              "usage": {"output_tokens": len(reply)}})
        sse("message_stop", {"type": "message_stop"})
        self.close_connection = True


@pytest.fixture
def standin():
    StandIn.requests = []
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), StandIn)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


MSGS = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": [
        {"type": "text", "text": "What is in this plot?"},
        {"type": "image", "mime": "image/png", "data": "iVBORw0KGgoAAAANSUhEUg=="},
    ]},
]


def test_streams_text_and_usage(standin, monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", GOOD_KEY)
    b = load_backend("claude-sonnet-4-6", base_url=standin)
    assert b.manifest["backend"] == "anthropic" and b.manifest["model"] == "claude-sonnet-4-6"
    assert b.supports_images is True
    events = list(b.stream(MSGS, Sampling(max_tokens=50, temperature=0.2), cache_key="d1"))
    assert [e["text"] for e in events if e["type"] == "token"] == REPLY
    done = events[-1]
    assert done["type"] == "done" and done["text"] == "".join(REPLY)
    assert done["finish_reason"] == "stop"
    f = done["figures"]
    assert f["prompt_tokens"] == 21 + 100 + 7
    assert f["cached_prompt_tokens"] == 100
    assert f["completion_tokens"] == len(REPLY)
    assert f["ttft_s"] > 0

    sent = StandIn.requests[-1]["body"]
    assert sent["system"] == "You are terse."
    assert sent["model"] == "claude-sonnet-4-6" and sent["max_tokens"] == 50 and sent["stream"] is True
    assert sent["temperature"] == 0.2 and "top_p" not in sent and "top_k" not in sent
    blocks = sent["messages"][0]["content"]
    assert sent["messages"][0]["role"] == "user"
    assert blocks[0] == {"type": "text", "text": "What is in this plot?"}
    assert blocks[1]["type"] == "image"
    assert blocks[1]["source"] == {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgoAAAANSUhEUg=="}
    assert blocks[-1]["cache_control"] == {"type": "ephemeral"}  # the growing dialog is cached
    assert MSGS[1]["content"][1] == {"type": "image", "mime": "image/png", "data": "iVBORw0KGgoAAAANSUhEUg=="}


def test_max_tokens_maps_to_length_and_engine_works(standin, monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", GOOD_KEY)
    engine = Engine(load_backend(backend="anthropic", model="claude-haiku-4-5", base_url=standin))
    try:
        done = engine.generate([{"role": "user", "content": "hi"}], Sampling(max_tokens=2))
        assert done["text"] == "Hello from" and done["finish_reason"] == "length"
        assert "cache_control" not in json.dumps(StandIn.requests[-1]["body"])  # no cache_key, no breakpoint
    finally:
        engine.close()


def test_missing_key_is_a_clear_error(standin, monkeypatch):
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    with pytest.raises(ModelError) as e:
        load_backend("claude-sonnet-4-6", base_url=standin)
    assert "ANTHROPIC_API_KEY" in str(e.value)


def test_rejected_key_is_a_clear_error(standin, monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-wrong")
    b = load_backend("claude-sonnet-4-6", base_url=standin)
    msgs = [{"role": "user", "content": "hi"}]
    with pytest.raises(ModelError) as e:
        list(b.stream(msgs, Sampling(max_tokens=5)))
    assert "rejected" in str(e.value) and "ANTHROPIC_API_KEY" in str(e.value)
    assert "invalid x-api-key" in str(e.value)
    assert msgs == [{"role": "user", "content": "hi"}]


def test_k_candidates_are_concurrent_requests(standin, monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", GOOD_KEY)
    b = load_backend("claude-sonnet-4-6", base_url=standin)
    events = list(b.stream_many([{"role": "user", "content": "hi"}], [Sampling(max_tokens=50, seed=s) for s in range(3)]))
    done = {ev["seq"]: ev for ev in events if ev["type"] == "done"}
    assert sorted(done) == [0, 1, 2] and {ev["text"] for ev in done.values()} == {"".join(REPLY)}
    assert len(StandIn.requests) == 3
