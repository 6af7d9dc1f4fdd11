"""The feedback turn: wording per status, what a failing check computed, ANSI stripped, budgets kept."""

import contextlib
import io

import pytest

from execfeedback.loop.checks import instrument, instrument_candidate, parse_check_output
from execfeedback.loop.feedback import (
    FeedbackConfig,
    clean_traceback,
    error_signature,
    feedback_message,
    syntax_error_obs,
)

INSTRUCTION = "Return the whole corrected code in one ```python block."


def report_for(candidate, tests):
    ns, out = {"__name__": "__main__"}, io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(instrument_candidate(candidate), ns)
        exec(instrument(tests), ns)
    return parse_check_output(out.getvalue())


CATA = "def f(s):\n    return s if s == s[::-1] else s + s[-2::-1]\n"


def test_check_failed_says_what_the_call_returned():
    report, stdout = report_for(CATA, "assert f('aba') == 'aba'\nassert f('cata') == 'catac'\n")
    msg = feedback_message({"status": "check_failed", "checks": report.to_dict(), "stdout": stdout})
    assert "`f('cata')` returned 'catatac', expected 'catac'" in msg
    assert msg == ("Your code ran, but a check failed (1 of 2 passed):\n"
                   "    assert f('cata') == 'catac'\n"
                   "`f('cata')` returned 'catatac', expected 'catac'\n\n" + INSTRUCTION)


def test_check_failed_accepts_the_report_object_too():
    report, _ = report_for(CATA, "assert f('cata') == 'catac'\n")
    assert "`f('cata')` returned 'catatac', expected 'catac'" in feedback_message({"status": "check_failed", "checks": report})


def test_check_values_can_be_left_out_for_comparison():
    report, _ = report_for(CATA, "assert f('cata') == 'catac'\n")
    msg = feedback_message({"status": "check_failed", "checks": report}, FeedbackConfig(include_check_values=False))
    assert "assert f('cata') == 'catac'\nAssertionError" in msg and "returned" not in msg


@pytest.mark.parametrize("test, phrase", [
    ("assert f('ab') != 'aba'", "`f('ab')` returned 'aba', expected anything but 'aba'"),
    ("assert len(f('ab')) < 2", "`len(f('ab'))` returned 3, expected a value < 2"),
    ("assert 'z' in f('ab')", "`f('ab')` returned 'aba', which does not contain 'z'"),
    ("assert f('ab') in ('x', 'y')", "`f('ab')` returned 'aba', expected one of ('x', 'y')"),
    ("assert abs(len(f('ab')) / 2 - 1) < 1e-9", "`len(f('ab')) / 2` returned 1.5, expected 1 (within 1e-9)"),
    ("assert not f('ab')", "`f('ab')` returned 'aba', expected a false value"),
    ("assert isinstance(f('ab'), list)", "`isinstance(f('ab'), list)` was False: `f('ab')` returned 'aba'"),
    ("assert f('ab') is None", "`f('ab')` returned 'aba', expected None"),
    ("assert tuple(f('a')) == ['a']", "`tuple(f('a'))` returned ('a',), expected ['a']"),
    ("assert str(len(f('a'))) == 1", "`str(len(f('a')))` returned '1', expected 1"),
    ("assert [f('a')] == ('a',)", "`[f('a')]` returned ['a'], expected ('a',)"),
])
def test_wording_of_each_comparison(test, phrase):
    report, _ = report_for(CATA, test)
    assert phrase in feedback_message({"status": "check_failed", "checks": report})


def test_equal_looking_values_of_different_types_are_pointed_out():
    report, _ = report_for("def f():\n    return '1'\n", "assert f() == 1\n")
    assert "`f()` returned '1', expected 1" in feedback_message({"status": "check_failed", "checks": report})
    report, _ = report_for("class One:\n    def __repr__(self):\n        return '1'\ndef f():\n    return One()\n", "assert f() == 1\n")
    assert "`f()` returned 1, expected 1 (got type One, expected type int)" in feedback_message({"status": "check_failed", "checks": report})
    report, _ = report_for("def f():\n    return float('nan')\n", "assert f() == float('nan')\n")
    assert "(they print the same but are not equal)" in feedback_message({"status": "check_failed", "checks": report})


def test_check_whose_call_raised_shows_error_frames_and_locals():
    candidate = "def f(s):\n    first = s[0]\n    return first + s[1]\n"
    report, _ = report_for(candidate, "assert f('ab') == 'ab'\nassert f('a') == 'a'\n")
    msg = feedback_message({"status": "check_failed", "checks": report})
    assert "    assert f('a') == 'a'\n`f('a')` raised IndexError: string index out of range" in msg
    assert 'File "<solution>", line 3, in f\n    return first + s[1]' in msg  # hash-free file name
    assert "Local values in `f` at line 3 when it failed:\n  s = 'a'\n  first = 'a'" in msg
    assert msg.endswith(INSTRUCTION)


def test_check_message_from_the_tests_is_shown():
    report, _ = report_for(CATA, "try:\n    f('x')\nexcept ValueError:\n    pass\nelse:\n    raise AssertionError(\"f('x') should raise ValueError\")\n")
    assert "Check message: f('x') should raise ValueError" in feedback_message({"status": "check_failed", "checks": report})


ANSI_TB = [
    "\x1b[31m---------------------------------------------------------------------------\x1b[39m",
    "\x1b[31mIndexError\x1b[39m                                Traceback (most recent call last)",
    "\x1b[36mCell\x1b[39m\x1b[36m \x1b[39m\x1b[32mIn[3]\x1b[39m\x1b[32m, line 13\x1b[39m\n\x1b[32m---> 13\x1b[39m     del __loopbook_run__\n",
    "    [... skipping hidden 2 frame]\n",
    "\x1b[36mFile \x1b[39m\x1b[32m<solution-1a2b3c4d>:4\x1b[39m, in \x1b[36mf\x1b[39m\x1b[34m(s)\x1b[39m\n"
    "\x1b[32m----> 4\x1b[39m     \x1b[38;5;28;01mreturn\x1b[39;00m s[\x1b[32m10\x1b[39m]\n",
    "\x1b[31mIndexError\x1b[39m: string index out of range",
]


def error_obs(**extra):
    obs = {"status": "error", "ename": "IndexError", "evalue": "string index out of range", "traceback": ANSI_TB,
           "stdout": "", "stderr": "", "locals": {"ename": "IndexError", "function": "f", "line": 4, "locals": {"s": "'ab'"}}}
    obs.update(extra)
    return obs


def test_error_wording_strips_ansi_and_wrapper_frames():
    msg = feedback_message(error_obs())
    assert msg == (
        "Your code raised IndexError: string index out of range\n\n"
        "Traceback (most recent call last):\n"
        "File <solution>:4, in f(s)\n"
        "----> 4     return s[10]\n"
        "IndexError: string index out of range\n\n"
        "Local values in `f` at line 4 when it failed:\n  s = 'ab'\n\n" + INSTRUCTION)


def test_locals_can_be_a_plain_mapping_or_left_out():
    assert "Local values when it failed:\n  s = 'ab'" in feedback_message(error_obs(locals={"s": "'ab'"}))
    assert "Local values" not in feedback_message(error_obs(), FeedbackConfig(include_locals=False))


def test_timeout_wording():
    msg = feedback_message({"status": "timeout", "timeout_s": 10.0, "traceback": [], "stdout": "step 1\n"})
    assert msg.startswith("Your code ran longer than 10 s and was stopped.")
    assert "Output (last part):\nstep 1" in msg and msg.endswith(INSTRUCTION)
    assert feedback_message({"status": "timeout"}).startswith("Your code ran too long and was stopped.")


def test_died_wording_includes_stderr_tail():
    msg = feedback_message({"status": "died", "stdout": "", "stderr": "MemoryError while allocating\n"})
    assert msg.startswith("The Python process running your code died")
    assert "Error output (last part):\nMemoryError while allocating" in msg


def test_syntax_error_with_line_and_caret():
    obs = syntax_error_obs("def f(x):\n    return x +\n")
    assert obs["status"] == "syntax_error" and obs["lineno"] == 2
    assert feedback_message(obs) == ("Your code has a syntax error at line 2:\n"
                                     "    return x +\n"
                                     "              ^\n"
                                     "SyntaxError: invalid syntax\n\n" + INSTRUCTION)
    assert "    def f(x)\n            ^\nSyntaxError: expected ':'" in feedback_message(syntax_error_obs("def f(x)\n    return x\n"))
    assert syntax_error_obs("x = 1\n") is None


def test_syntax_error_from_a_kernel_traceback():
    tb = ["  \x1b[36mCell\x1b[39m\x1b[36m \x1b[39m\x1b[32mIn[2]\x1b[39m\x1b[32m, line 3\x1b[39m\n\x1b[31m    \x1b[39m"
          "\x1b[31mdef f(:\x1b[39m\n          ^\n\x1b[31mSyntaxError\x1b[39m\x1b[31m:\x1b[39m invalid syntax\n"]
    msg = feedback_message({"status": "syntax_error", "ename": "SyntaxError", "evalue": "invalid syntax (123.py, line 3)", "traceback": tb})
    assert msg.startswith("Your code has a syntax error at line 3:\n")
    assert "def f(:\n          ^\nSyntaxError: invalid syntax" in msg and "\x1b" not in msg


def test_no_code_wording():
    assert feedback_message({"status": "no_code"}) == "Your reply had no code block.\n\nReturn the whole code in one ```python block."


def test_unknown_status_is_refused():
    with pytest.raises(ValueError, match="check_failed"):
        feedback_message({"status": "exploded"})


def test_traceback_budget_keeps_head_and_tail():
    frames = [f'  File "<solution>", line {i}, in step{i}\n    value = step{i + 1}(value)' for i in range(200)]
    tb = ["Traceback (most recent call last):"] + frames + ["RecursionError: maximum recursion depth exceeded"]
    text = clean_traceback(tb, 1500)
    assert len(text) <= 1500
    assert text.startswith("Traceback (most recent call last):") and text.endswith("RecursionError: maximum recursion depth exceeded")
    assert "characters cut" in text
    msg = feedback_message(error_obs(traceback=tb, ename="RecursionError", evalue="maximum recursion depth exceeded"))
    assert len(msg) < 1500 + 400


def test_stdout_tail_budget():
    stdout = "".join(f"line {i}\n" for i in range(2000))
    msg = feedback_message(error_obs(stdout=stdout), FeedbackConfig(stdout_tail_chars=200))
    section = msg.split("Output (last part):\n", 1)[1].split("\n\n")[0]
    assert len(section) <= 200 and section.endswith("line 1999") and "line 0\n" not in msg


def test_locals_budget():
    many = {f"var{i}": "'" + "x" * 100 + "'" for i in range(30)}
    msg = feedback_message(error_obs(locals={"function": "f", "line": 2, "locals": many}), FeedbackConfig(locals_chars=300))
    section = msg.split("when it failed:\n", 1)[1].split("\n\n")[0]
    assert len(section) <= 300 + len("\n  ...") and section.endswith("...") and "var29" not in section


def test_check_report_marker_in_stdout_is_not_shown():
    report, _ = report_for(CATA, "print('dbg')\nassert f('cata') == 'catac'\n")
    raw = "dbg\n\n__LOOPBOOK_CHECKS__ " + '{"passed": 0, "total": 1, "failures": []}\n'
    msg = feedback_message({"status": "check_failed", "checks": report, "stdout": raw})
    assert "__LOOPBOOK" not in msg and "Output (last part):\ndbg" in msg


def test_config_from_dict():
    cfg = FeedbackConfig.from_dict({"traceback_chars": 500, "instruction": "Send the fix."})
    assert cfg.traceback_chars == 500 and cfg.instruction == "Send the fix." and cfg.stdout_tail_chars == 800
    assert FeedbackConfig.from_dict(cfg.to_dict()) == cfg
    assert feedback_message({"status": "no_code"}, FeedbackConfig.from_dict({"no_code_instruction": "Code, please."})).endswith("Code, please.")
    with pytest.raises(ValueError, match="unknown feedback setting.*tb_chars.*known: traceback_chars"):
        FeedbackConfig.from_dict({"tb_chars": 5})
    with pytest.raises(ValueError, match="whole number"):
        FeedbackConfig.from_dict({"traceback_chars": -1})
    with pytest.raises(ValueError, match="bool"):
        FeedbackConfig.from_dict({"include_locals": "yes"})


def test_error_signature_ignores_addresses_numbers_and_file_hashes():
    a = {"status": "error", "ename": "TypeError", "evalue": "<__main__.Node object at 0x7f3a2c1d9e50> is not iterable (line 12)"}
    b = {"status": "error", "ename": "TypeError", "evalue": "<__main__.Node object at 0x7f99aa001230> is not iterable (line 14)"}
    assert error_signature(a) == error_signature(b)
    assert error_signature(a) != error_signature(b | {"ename": "ValueError"})
    assert error_signature({"status": "timeout", "timeout_s": 3}) == error_signature({"status": "timeout", "timeout_s": 9})
    assert error_signature({"status": "no_code"}) != error_signature({"status": "timeout"})


def test_error_signature_of_check_failures_tells_checks_apart():
    first, _ = report_for(CATA, "assert f('cata') == 'catac'\n")
    other_value, _ = report_for("def f(s):\n    return s * 2\n", "assert f('cata') == 'catac'\n")
    other_check, _ = report_for(CATA, "assert f('cat') == 'catac'\n")
    sig = lambda r: error_signature({"status": "check_failed", "checks": r.to_dict()})
    assert sig(first) == sig(other_value)  # same failing check: no progress
    assert sig(first) != sig(other_check)
    raised_a, _ = report_for("def f(s):\n    return s[99]\n", "assert f('cata') == 'catac'\n")
    raised_b, _ = report_for("def f(s):\n    return s + 1\n", "assert f('cata') == 'catac'\n")
    assert sig(raised_a) != sig(raised_b) and "IndexError" in sig(raised_a)


def test_a_reply_cut_off_at_the_token_limit_is_named_as_the_cause():
    """Seen on HumanEval: the model repeated `if n == k:` lines until the limit; 'syntax error at line 101' misled it."""
    obs = syntax_error_obs("def f(n):\n    if n == 1:\n        return 1\n    if")
    obs.update(cut_off=True, max_tokens=768)
    msg = feedback_message(obs)
    assert msg.startswith("Your reply reached the length limit (768 tokens) and was cut off")
    assert "syntax error at line 4" in msg
    no_code = feedback_message({"status": "no_code", "cut_off": True, "max_tokens": 64})
    assert no_code.startswith("Your reply reached the length limit (64 tokens)")
    # a check that failed is about the code, not the length: no cut-off line there
    assert "length limit" not in feedback_message({"status": "check_failed", "cut_off": True,
                                                   "checks": {"passed": 0, "total": 1, "failures": []}})
    assert "length limit" not in feedback_message(syntax_error_obs("def f(:\n"))
