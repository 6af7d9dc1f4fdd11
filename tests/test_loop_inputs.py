"""Model-written test inputs for selection by execution (execfeedback/loop/inputs.py): the calls are kept, the
outputs the model predicts are not; the coder model (slow) does write usable calls for a task."""
from __future__ import annotations

import asyncio

import pytest

from execfeedback.loop.inputs import defined_functions, inputs_prompt, parse_inputs
from execfeedback.loop.select import shared_inputs


def test_only_calls_of_the_function_with_literal_arguments_are_kept_never_a_predicted_output():
    reply = ("Here are some:\n```python\nf(1)\nf([1, 2], k=3)\nassert f(5) == 120\nprint(f('x'))\nf(g(2))\n"
             "h(3)\nf(1)\nf(\n```")
    calls = parse_inputs(reply, ["f"], 10)
    assert calls == [("f", [1], {}), ("f", [[1, 2]], {"k": 3}), ("f", [5], {}), ("f", ["x"], {})]
    assert parse_inputs(reply, ["f"], 2) == calls[:2]
    assert parse_inputs("No code here, sorry.", ["f"], 6) == []


def test_written_inputs_join_the_checks_inputs_with_their_mutations():
    inputs = shared_inputs("assert f(2) == 4", [("f", [10], {})])
    assert inputs[:2] == ["f(2)", "f(10)"] and "f(11)" in inputs and "f(3)" in inputs
    assert "f(4)" not in inputs  # the check's expected value is never made an input


def test_the_prompt_names_the_function_and_asks_for_no_results():
    code = "import math\n\ndef area(r: float) -> float:\n    return math.pi * r * r\n"
    assert defined_functions(code) == ["area"]
    text = inputs_prompt([{"role": "user", "content": "Write area(r)."}], code, "area", 5)[0]["content"]
    assert text.startswith("Write area(r).") and "`def area(r: float) -> float:`" in text and "no results" in text


@pytest.mark.slow
def test_the_coder_model_writes_calls_of_the_tasks_function():
    from local_model import Engine, load_backend
    from local_model.registry import MODELS, install_command, is_installed

    if not is_installed(MODELS["qwen2.5-coder-1.5b"]):
        pytest.skip(f"the coder model is not installed: `{install_command('qwen2.5-coder-1.5b')}`")
    from execfeedback.loop.loop import Loop, LoopConfig

    engine = Engine(load_backend("qwen2.5-coder-1.5b"))
    try:
        code = "def run_length_encode(s: str) -> list:\n    return []\n"
        task = [{"role": "user", "content": "Write run_length_encode(s) that returns a list of (char, count) "
                                            "pairs for each run of equal characters in s."}]
        sampling = Loop(engine, None, None, LoopConfig()).inputs_sampling()

        async def ask():
            async for ev in engine.stream(inputs_prompt(task, code, "run_length_encode", 6), sampling):
                if ev["type"] == "done":
                    return ev["text"]

        reply = asyncio.run(ask())
        calls = parse_inputs(reply, ["run_length_encode"], 6)
        assert len(calls) >= 3, reply
        assert all(isinstance(args[0], str) for _, args, _ in calls)
    finally:
        engine.close()
