"""Static analysis before running: pyflakes findings that fail for sure, against the kernel's namespace."""
from __future__ import annotations

from execfeedback.loop.static import certain_failures, observation


def test_undefined_names_and_misplaced_statements_are_certain_failures():
    found = certain_failures("def f(x):\n    return y + x\nprint(nowhere)\nreturn 3\n")
    assert [(f.ename, f.line) for f in found] == [("NameError", 2), ("NameError", 3), ("SyntaxError", 4)]
    assert certain_failures("for i in range(3):\n    pass\ncontinue\n")[0].message == "'continue' not properly in loop"


def test_names_the_kernel_holds_builtins_and_ipython_names_are_not_flagged():
    assert certain_failures("print(df.shape)") != []
    assert certain_failures("print(df.shape)", defined={"df"}) == []
    assert certain_failures("display(len([1]))\nget_ipython()\n") == []


def test_style_findings_and_guarded_names_are_not_failures():
    assert certain_failures("import os\nimport os\nx = 1\n") == []  # unused, redefined: runs fine
    assert certain_failures("try:\n    foo\nexcept NameError:\n    foo = 1\n") == []
    assert certain_failures("def broken(:\n") == []  # the syntax check reports it, with the interpreter's words


def test_the_observation_reads_like_the_error_running_it_would_give():
    obs = observation(certain_failures("def f():\n    return total\n"))
    assert obs["status"] == "error" and obs["ename"] == "NameError" and obs["static"] is True
    assert obs["evalue"] == "name 'total' is not defined"
    assert obs["traceback"][-1] == "line 2: undefined name 'total'"
