"""`&`fn`` tools through the remote backends: llama.cpp's OpenAI-compatible server on loopback (the real
`llama_cpp.server` on SmolLM2, which forces a call by name with a grammar from the schema) and a loopback stand-in for
Anthropic's Messages API driven through the real `anthropic` SDK. The kernel and the tool loop are the real ones."""

from __future__ import annotations

import http.server
import json
import threading

import pytest

from execfeedback.traces import TraceStore
from execfeedback.workspace.ask import KernelAccess, ask
from local_model import Engine, Sampling, load_backend
from kernelhelpers import pool_session
from test_model_anthropic import GOOD_KEY
import test_model_openai

KEY = "remote-tools"
SETUP = (KEY, '''
import pandas as pd
df = pd.DataFrame({"n": [1, 2, 3]})

def scale(n: int) -> int:
    """Multiply n by ten."""
    return n * 10
''')
PROMPT = "Here is $`df`. Use &`scale` on 4."
server_url = test_model_openai.server_url  # that module's llama_cpp.server on loopback, as a fixture here


@pytest.fixture(scope="module")
def session():
    yield from pool_session(SETUP)


@pytest.fixture
def dialog(store):
    return store, store.create_dialog("tools")


def run_ask(session, engine, store, d, sampling):
    async def key():
        return KEY
    m = store.add_message(d["id"], "prompt", PROMPT)
    res = session.run(ask(store, engine, m["id"], sampling=sampling, kernel=KernelAccess(session.pool, key)),
                      timeout=240)
    rid = store.get_message(m["id"])["reply_meta"]["request_id"]
    return res, TraceStore(store).tool_steps(rid, with_inputs=True)


def test_openai_compatible_server_calls_the_kernel_tool(session, server_url, dialog):
    store, d = dialog
    engine = Engine(load_backend(backend="openai", base_url=server_url))
    try:
        res, steps = run_ask(session, engine, store, d, Sampling(max_tokens=40, tool_choice="required"))
    finally:
        engine.close()
    assert res.status == "done", res
    call = res.tools["steps"][0]["calls"][0]
    assert call["name"] == "scale" and call["status"] == "ok"
    assert call["result"] == str(json.loads(call["arguments"])["n"] * 10)
    assert call["id"]  # the server's own call id, sent back with the result
    assert len(steps) == 2 and steps[1]["calls"] == []
    sent = steps[1]["input_messages"]
    assert sent[-1] == {"role": "tool", "tool_call_id": call["id"], "name": "scale", "content": call["result"]}
    assert "(3, 1)" in steps[0]["input_messages"][-1]["content"] or "3 rows" in steps[0]["input_messages"][-1]["content"]


class ToolStandIn(http.server.BaseHTTPRequestHandler):
    """Anthropic's Messages stream: a tool_use block for the first offered tool until a tool_result comes back,
    then a text answer that quotes the result."""

    protocol_version = "HTTP/1.1"
    requests: list[dict] = []

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        auth = self.headers.get("Authorization", "")
        if (self.headers.get("x-api-key") or auth.removeprefix("Bearer ")) != GOOD_KEY:
            self.send_response(401)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        ToolStandIn.requests.append(body)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()

        def sse(event, data):
            self.wfile.write(f"event: {event}\ndata: {json.dumps({'type': event, **data})}\n\n".encode())
            self.wfile.flush()

        last = body["messages"][-1]["content"]
        results = [b for b in last if isinstance(b, dict) and b.get("type") == "tool_result"]
        sse("message_start", {"message": {"id": "msg_1", "type": "message", "role": "assistant", "model": body["model"],
                                          "content": [], "stop_reason": None, "stop_sequence": None,
                                          "usage": {"input_tokens": 30, "output_tokens": 1}}})
        if body.get("tools") and not results:
            tool = body["tools"][0]["name"]
            sse("content_block_start", {"index": 0, "content_block": {"type": "tool_use", "id": "toolu_01",
                                                                      "name": tool, "input": {}}})
            for piece in ('{"n"', ': 4}'):
                sse("content_block_delta", {"index": 0, "delta": {"type": "input_json_delta", "partial_json": piece}})
            stop = "tool_use"
        else:
            text = f"The tool said {results[0]['content']}." if results else "No tools."
            sse("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}})
            sse("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": text}})
            stop = "end_turn"
        sse("content_block_stop", {"index": 0})
        sse("message_delta", {"delta": {"stop_reason": stop, "stop_sequence": None}, "usage": {"output_tokens": 5}})
        sse("message_stop", {})
        self.close_connection = True


@pytest.fixture
def tool_standin():
    ToolStandIn.requests = []
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), ToolStandIn)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def test_anthropic_tool_use_runs_in_the_kernel_and_the_result_goes_back(session, tool_standin, dialog, monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", GOOD_KEY)
    store, d = dialog
    engine = Engine(load_backend("claude-sonnet-4-6", base_url=tool_standin))
    try:
        res, steps = run_ask(session, engine, store, d, Sampling(max_tokens=50, tool_choice="required"))
    finally:
        engine.close()
    assert res.status == "done" and res.reply == "The tool said 40.", res.error
    call = res.tools["steps"][0]["calls"][0]
    assert (call["id"], call["name"], json.loads(call["arguments"]), call["result"]) == ("toolu_01", "scale", {"n": 4}, "40")
    first, second = ToolStandIn.requests
    assert first["tools"] == [{"name": "scale", "description": "Multiply n by ten.",
                               "input_schema": first["tools"][0]["input_schema"]}]
    assert first["tools"][0]["input_schema"]["properties"]["n"]["type"] == "integer"
    assert first["tool_choice"] == {"type": "any"} and second["tool_choice"] == {"type": "auto"}
    assert second["messages"][-2] == {"role": "assistant", "content": [
        {"type": "tool_use", "id": "toolu_01", "name": "scale", "input": {"n": 4}}]}
    result_block = second["messages"][-1]["content"][0]
    assert result_block["type"] == "tool_result" and result_block["tool_use_id"] == "toolu_01"
    assert result_block["content"] == "40"
    assert "Multiply" not in json.dumps(first["messages"])  # the tool goes in `tools`, not in the text
    assert [s["step"] for s in steps] == [0, 1]
