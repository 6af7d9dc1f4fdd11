"""Code extraction from model replies."""

import pytest

from execfeedback.loop.extract import extract_code


def test_one_python_fence_with_prose_around():
    r = extract_code("Here you go:\n\n```python\ndef f(x):\n    return x + 1\n```\n\nThis adds one.")
    assert r.ok and r.blocks == 1 and not r.truncated
    assert r.code == "def f(x):\n    return x + 1\n"


@pytest.mark.parametrize("lang", ["py", "Python", "python3", "ipython"])
def test_python_language_names(lang):
    assert extract_code(f"```{lang}\nx = 1\n```").code == "x = 1\n"


def test_helper_and_solution_blocks_are_joined_in_order():
    reply = "A helper:\n```python\ndef g(x):\n    return 2 * x\n```\nThe solution:\n```py\ndef f(x):\n    return g(x)\n```\n"
    r = extract_code(reply)
    assert r.blocks == 2
    assert r.code == "def g(x):\n    return 2 * x\n\ndef f(x):\n    return g(x)\n"
    ns = {}
    exec(r.code, ns)
    assert ns["f"](3) == 6


def test_a_redefined_draft_is_dropped_but_its_imports_are_kept():
    reply = ("First try:\n```python\nimport math\ndef f(x):\n    return x\nprint(f(2))\n```\n"
             "Wait, that is wrong. Corrected:\n```python\ndef f(x):\n    return math.sqrt(x)\n```")
    r = extract_code(reply)
    assert r.code == "import math\n\ndef f(x):\n    return math.sqrt(x)\n"
    assert "draft" in r.reason and r.blocks == 2


def test_other_languages_are_ignored():
    reply = "Install it:\n```bash\npip install numpy\n```\nThen:\n```python\nimport numpy\n```\nOutput:\n```text\nok\n```"
    assert extract_code(reply).code == "import numpy\n"


def test_only_non_python_blocks_is_no_code_with_a_reason():
    r = extract_code("Run this:\n```bash\nls -la\n```")
    assert not r.ok and r.code is None and "bash" in r.reason


def test_unlabelled_fence_is_taken_only_when_it_is_code():
    reply = "```\ndef f():\n    return 5\n```\nIt prints:\n```\n5\n```\nor\n```\nhello world\n```"
    r = extract_code(reply)
    assert r.code == "def f():\n    return 5\n" and r.blocks == 1


def test_unclosed_final_fence_drops_a_cut_off_example_call():
    r = extract_code("```python\ndef f(x):\n    return x * 2\n\n# example\nprint(f(")
    assert r.ok and r.truncated and "not closed" in r.reason
    assert r.code.startswith("def f(x):\n    return x * 2\n") and "print" not in r.code
    compile(r.code, "<t>", "exec")


def test_unclosed_fence_cut_inside_a_function_is_kept_whole():
    # Dropping the half-written def would hide the problem; the SyntaxError is fed back instead.
    r = extract_code("```python\ndef f(x):\n    if x:\n        return 1\n    else:")
    assert r.truncated and r.code == "def f(x):\n    if x:\n        return 1\n    else:\n"


def test_unclosed_fence_that_parses_is_taken_as_is():
    r = extract_code("Sure:\n```python\ndef f(x):\n    return x\n")
    assert r.truncated and r.code == "def f(x):\n    return x\n"


def test_fence_inside_a_list_item_and_tildes():
    assert extract_code("1. Define it:\n   ```python\n   def f(x):\n       return x\n   ```\n").code == "def f(x):\n    return x\n"
    assert extract_code("~~~python\ny = 2\n~~~").code == "y = 2\n"


def test_a_longer_fence_may_hold_backticks():
    r = extract_code('````python\ns = """```"""\n````')
    assert r.code == 's = """```"""\n'


def test_bare_code_reply_without_fence():
    r = extract_code("def f(x):\n    return x + 1\n")
    assert r.ok and r.blocks == 0 and r.code == "def f(x):\n    return x + 1\n"


def test_unfenced_code_after_prose():
    r = extract_code("Here is the function:\ndef f(x):\n    return x\nIt returns x unchanged.")
    assert r.code == "def f(x):\n    return x\n"


@pytest.mark.parametrize("reply", ["", "   \n", "I cannot help with that.", "Yes", "42", "Output: 5",
                                   "The answer is in the code below."])
def test_prose_or_empty_is_no_code(reply):
    r = extract_code(reply)
    assert not r.ok and r.code is None and r.reason


def test_doctest_prompts_are_stripped_and_outputs_dropped():
    reply = "```python\n>>> def f(x):\n...     return x + 1\n...\n>>> f(2)\n3\n>>> f(3)\n4\n```"
    r = extract_code(reply)
    assert r.code.splitlines() == ["def f(x):", "    return x + 1", "", "f(2)", "f(3)"]
    compile(r.code, "<t>", "exec")


def test_pycon_block_without_language_is_recognised():
    r = extract_code("```\n>>> x = [1, 2]\n>>> len(x)\n2\n```")
    assert r.code == "x = [1, 2]\nlen(x)\n"


def test_a_python_block_with_a_syntax_error_is_still_returned():
    # The loop compiles the code and feeds the SyntaxError back; extraction does not hide it.
    r = extract_code("```python\ndef f(:\n    pass\n```")
    assert r.ok and r.code == "def f(:\n    pass\n"


def test_empty_python_block_and_windows_line_breaks():
    assert extract_code("```python\n```").reason == "the reply's Python code block is empty"
    r = extract_code("Code:\r\n```python\r\nx = 1\r\n```\r\nDone.")
    assert r.code == "x = 1\n" and not r.truncated
