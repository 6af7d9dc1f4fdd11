"""OutputCapture on its own: head and tail under the cap, merging, display caps, clears."""

import base64

from kernels.capture import OutputCapture


def stream(text, name="stdout"):
    return {"name": name, "text": text}


def test_small_streams_merge_per_stream_and_keep_order():
    cap = OutputCapture(cap_chars=1000)
    live = []
    for text, name in [("a\n", "stdout"), ("b\n", "stdout"), ("warn\n", "stderr"), ("c\n", "stdout")]:
        live += cap.add("stream", stream(text, name))
    assert cap.finish() == [
        {"output_type": "stream", "name": "stdout", "text": "a\nb\n"},
        {"output_type": "stream", "name": "stderr", "text": "warn\n"},
        {"output_type": "stream", "name": "stdout", "text": "c\n"},
    ]
    assert [o["text"] for o in live] == ["a\n", "b\n", "warn\n", "c\n"]
    assert not cap.truncated and cap.original_chars == 11


def test_over_the_cap_keeps_head_and_tail_with_one_marker():
    cap = OutputCapture(cap_chars=100)
    lines = [f"line {i:04d}\n" for i in range(1000)]  # 10 characters each
    live = []
    for line in lines:
        live += cap.add("stream", stream(line))
    (out,) = cap.finish()
    full = "".join(lines)
    assert cap.truncated and cap.original_chars == len(full) == 10_000
    assert out["text"].startswith(full[:50])
    assert out["text"].endswith(full[-50:])
    assert "... [9,900 characters omitted] ...\n" in out["text"]
    # live: the head (5 lines), then a single notice, then nothing more
    assert "".join(o["text"] for o in live[:-1]) == full[:50]
    assert "cap" in live[-1]["text"] and len(live) == 6


def test_one_huge_chunk_is_cut_without_keeping_it():
    cap = OutputCapture(cap_chars=1000)
    cap.add("stream", stream("h" * 400 + "x" * 10_000_000 + "t" * 600))
    assert cap.tail_chars == 500 and sum(len(c.text) for c in cap.tail) == 500  # the 10 MB is let go
    (out,) = cap.finish()
    assert out["text"] == "h" * 400 + "x" * 100 + "\n... [10,000,000 characters omitted] ...\n" + "t" * 500


def test_many_small_chunks_after_the_head_stay_bounded():
    cap = OutputCapture(cap_chars=200)
    for i in range(200_000):
        cap.add("stream", stream(f"{i}\n"))
    assert cap.tail_chars <= 100 and len(cap.tail) <= 100
    text = cap.finish()[0]["text"]
    assert text.endswith("199998\n199999\n") and text.startswith("0\n1\n2\n")


def test_big_image_is_replaced_by_a_note_and_small_one_kept():
    cap = OutputCapture(cap_chars=1000, display_cap_chars=1_000_000)
    small = base64.b64encode(b"\x89PNG" + b"\0" * 300).decode()
    big = "A" * 2_000_000
    cap.add("display_data", {"data": {"image/png": small, "text/plain": "<Image>"}, "metadata": {}})
    cap.add("display_data", {"data": {"image/png": big, "text/plain": "<Image>"}, "metadata": {}})
    first, second = cap.finish()
    assert first["data"]["image/png"] == small
    assert "image/png" not in second["data"]
    assert "2,000,000 characters omitted" in second["data"]["text/plain"]
    assert cap.truncated


def test_huge_text_result_becomes_a_preview():
    cap = OutputCapture(cap_chars=10_000)
    cap.add("execute_result", {"data": {"text/plain": "'" + "x" * 50_000 + "'"}, "metadata": {}, "execution_count": 3})
    (out,) = cap.finish()
    assert out["output_type"] == "execute_result" and out["execution_count"] == 3
    assert len(out["data"]["text/plain"]) < 2_000 and "cut to a preview" in out["data"]["text/plain"]
    assert cap.original_chars == 50_002 and cap.truncated


def test_clear_output_and_display_updates():
    cap = OutputCapture(cap_chars=1000)
    cap.add("stream", stream("old\n"))
    assert cap.add("clear_output", {"wait": True}) == []
    live = cap.add("stream", stream("new\n"))
    assert live[0] == {"output_type": "clear_output", "wait": False}
    cap.add("display_data", {"data": {"text/plain": "0%"}, "metadata": {}, "transient": {"display_id": "p"}})
    cap.add("update_display_data", {"data": {"text/plain": "100%"}, "metadata": {}, "transient": {"display_id": "p"}})
    assert cap.finish() == [
        {"output_type": "stream", "name": "stdout", "text": "new\n"},
        {"output_type": "display_data", "data": {"text/plain": "100%"}, "metadata": {}},
    ]


def test_error_is_shown_live_even_after_the_cap():
    cap = OutputCapture(cap_chars=100)
    cap.add("stream", stream("x" * 1000))
    live = cap.add("error", {"ename": "ValueError", "evalue": "bad", "traceback": ["tb"]})
    assert live == [{"output_type": "error", "ename": "ValueError", "evalue": "bad", "traceback": ["tb"]}]
    assert cap.finish()[-1]["ename"] == "ValueError"
