"""Rows of the `tools` format, from the store's tool_steps table (a prompt's `&`fn`` tool loop, migration 7).

One row per tool loop that ended in an answer: the conversation in OpenAI's tool-call message format (an assistant
turn with `tool_calls`, then one `tool` turn per result with its `tool_call_id`, ..., the final answer) and the tools
offered, which TRL's SFT trainer and `datasets` read as they are. Every message carries every field ("" or [] when
unused) so Parquet and `datasets` infer one schema; a call's `arguments` stay JSON text, as OpenAI sends them.
"""

from __future__ import annotations

import json
from typing import Callable, Iterator



def iter_loops(conn, where: str = "1", params: tuple = ()) -> Iterator[list[dict]]:
    """The steps of each tool loop, one list per request id, oldest loop first."""
    cur = conn.execute(f"SELECT request_id FROM tool_steps WHERE step = 0 AND ({where}) ORDER BY id", params)
    for (rid,) in cur.fetchall():
        rows = conn.execute("SELECT * FROM tool_steps WHERE request_id = ? ORDER BY step, id", (rid,))
        names = [c[0] for c in rows.description]
        yield [dict(zip(names, r)) for r in rows]


def _body(conn, digest: str) -> list[dict]:
    row = conn.execute("SELECT body FROM blobs WHERE hash = ?", (digest,)).fetchone()
    return json.loads(row[0]) if row else []


def message(m: dict, scrub: Callable[[str], str]) -> dict:
    """One message with every field of the format, its texts scrubbed."""
    content = m.get("content")
    if isinstance(content, list):  # image parts: their text only
        content = "\n".join(p.get("text", "") for p in content if isinstance(p, dict))
    calls = [{"id": c.get("id") or "", "type": "function",
              "function": {"name": (c.get("function") or {}).get("name") or "",
                           "arguments": scrub((c.get("function") or {}).get("arguments") or "{}")}}
             for c in m.get("tool_calls") or []]
    return {"role": m["role"], "content": scrub(content or ""), "tool_calls": calls,
            "tool_call_id": m.get("tool_call_id") or "", "name": m.get("name") or ""}


def tool_rows(conn, loops: Iterator[list[dict]], scrub: Callable[[str], str]) -> Iterator[dict]:
    """One row per finished loop (its last step answered without calls); loops cut short or stopped give none."""
    for steps in loops:
        last = steps[-1]
        if json.loads(last["calls"]) or last["finish_reason"] not in ("stop", "length"):
            continue
        calls = [c for s in steps for c in json.loads(s["calls"])]
        tools = json.loads(steps[0]["tools"])
        convo = _body(conn, last["input_hash"]) + [{"role": "assistant", "content": last["completion"]}]
        yield {"request_id": last["request_id"], "dialog_id": last["dialog_id"] or 0,
               "message_id": last["message_id"] or 0, "model": last["model"] or "", "backend": last["backend"] or "",
               "created_at": steps[0]["created_at"], "steps": len(steps), "calls": len(calls),
               "failed_calls": sum(c.get("status") != "ok" for c in calls),
               "tools": json.dumps([{"type": "function", "function": t} for t in tools], ensure_ascii=False),
               "messages": [message(m, scrub) for m in convo]}
