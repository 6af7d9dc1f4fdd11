from dialog.context import ContextOptions, build_context, trim_middle


def cell(i, type, source, **kw):
    return {"id": i, "position": i, "type": type, "source": source, "outputs": kw.pop("outputs", []),
            "reply": kw.pop("reply", ""), "pinned": kw.pop("pinned", False), "skipped": kw.pop("skipped", False), **kw}


def text_of(msgs):
    return "\n".join(m["content"] if isinstance(m["content"], str) else
                     "".join(p.get("text", "") for p in m["content"]) for m in msgs)


def test_roles_alternate_and_prompt_is_last():
    cells = [cell(0, "note", "intro"), cell(1, "code", "x = 1"),
             cell(2, "prompt", "first?", reply="first answer"), cell(3, "code", "y = 2"), cell(4, "prompt", "now?")]
    msgs = build_context(cells, cells[4])
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    assert msgs[1]["content"].endswith("first?") and "intro" in msgs[1]["content"]
    assert msgs[2]["content"] == "first answer"
    assert msgs[3]["content"].startswith("```python\ny = 2\n```") and msgs[3]["content"].endswith("now?")


def test_cells_below_the_prompt_and_skipped_cells_stay_out():
    cells = [cell(0, "code", "secret = 1", skipped=True), cell(1, "code", "a = 1"), cell(2, "prompt", "q"),
             cell(3, "code", "below = 1")]
    t = text_of(build_context(cells, cells[2]))
    assert "a = 1" in t and "secret" not in t and "below" not in t


def test_outputs_errors_and_images_render_as_text():
    err = {"output_type": "error", "ename": "ZeroDivisionError", "evalue": "division by zero",
           "traceback": ["\x1b[0;31mZeroDivisionError\x1b[0m                         Traceback", "----> 1 1/0"]}
    img = {"output_type": "display_data", "data": {"image/png": "iVBORw0KGgo=", "text/plain": "<Figure>"}, "metadata": {}}
    out = {"output_type": "stream", "name": "stdout", "text": "hello\n"}
    cells = [cell(0, "code", "1/0", outputs=[out, err, img]), cell(1, "prompt", "fix")]
    t = text_of(build_context(cells, cells[1]))
    assert "hello" in t and "ZeroDivisionError: division by zero" in t and "----> 1 1/0" in t
    assert "\x1b" not in t and "[image output: image/png]" in t and "iVBOR" not in t
    msgs = build_context(cells, cells[1], options=ContextOptions(images=True))
    parts = msgs[1]["content"]
    assert parts[0] == {"type": "image", "mime": "image/png", "data": "iVBORw0KGgo="}


def test_long_output_keeps_head_and_tail():
    big = "".join(f"line {i}\n" for i in range(5000))
    cells = [cell(0, "code", "loop", outputs=[{"output_type": "stream", "name": "stdout", "text": big}]),
             cell(1, "prompt", "q")]
    t = text_of(build_context(cells, cells[1], options=ContextOptions(output_chars=500)))
    assert "line 0\n" in t and "line 4999" in t and "characters omitted" in t and len(t) < 1500


def test_earlier_turns_render_identically_as_the_dialog_grows():
    cells = [cell(0, "code", "x = 1", outputs=[{"output_type": "stream", "name": "stdout", "text": "1\n"}]),
             cell(1, "prompt", "q1", reply="a1")]
    first = build_context(cells + [cell(2, "prompt", "q2")], cell(2, "prompt", "q2"))
    grown = cells + [cell(2, "prompt", "q2", reply="a2"), cell(3, "code", "z"), cell(4, "prompt", "q3")]
    second = build_context(grown, grown[4])
    assert second[: len(first)] == first


def test_budget_drops_oldest_unpinned_first():
    cells = [cell(0, "note", "oldest " * 50), cell(1, "note", "pinned " * 50, pinned=True),
             cell(2, "note", "newer " * 50), cell(3, "prompt", "question")]
    count = lambda msgs: len(text_of(msgs).split())
    msgs = build_context(cells, cells[3], options=ContextOptions(budget_tokens=130, system_prompt="S"), count_tokens=count)
    t = text_of(msgs)
    assert "oldest" not in t and "pinned" in t and "question" in t and "1 earlier cells omitted" in t
    msgs = build_context(cells, cells[3], options=ContextOptions(budget_tokens=60, system_prompt="S"), count_tokens=count)
    t = text_of(msgs)
    assert "pinned" in t and "newer" not in t and "question" in t


def test_system_prompt_is_configurable():
    cells = [cell(0, "prompt", "q")]
    assert build_context(cells, cells[0], options=ContextOptions(system_prompt="Be terse."))[0] == \
        {"role": "system", "content": "Be terse."}


def test_trim_middle():
    assert trim_middle("abc", 10) == "abc"
    t = trim_middle("a" * 50 + "b" * 50, 30)
    assert t.startswith("a" * 20) and t.endswith("b" * 10) and "70 characters omitted" in t
