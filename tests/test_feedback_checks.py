"""Visible checks that say what they computed, run with a plain exec in a fresh namespace."""

import contextlib
import io
import json

import pytest

from execfeedback.loop.checks import (
    CheckReport,
    candidate_filename,
    error_report,
    instrument,
    instrument_candidate,
    locals_of_failure,
    parse_check_output,
    parse_locals_output,
)

CANDIDATE = '''
import math

def f(s):
    """Buggy on purpose: mirrors too much."""
    return s if s == s[::-1] else s + s[-2::-1]

def g(x):
    return x * 0.1 * 3

def none(x):
    return None

def pair():
    return (1, 2)

def divide(x):
    y = x * 2
    return y / (x - x)
'''


def run(*snippets, ns=None):
    """exec each snippet in one namespace; return (namespace, stdout, stderr)."""
    ns = {"__name__": "__main__"} if ns is None else ns
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        for code in snippets:
            exec(code, ns)
    return ns, out.getvalue(), err.getvalue()


def check(tests, candidate=CANDIDATE):
    _, stdout, _ = run(instrument_candidate(candidate), instrument(tests))
    report, rest = parse_check_output(stdout)
    assert report is not None, stdout
    return report, rest


def only_failure(tests, candidate=CANDIDATE):
    report, _ = check(tests, candidate)
    assert len(report.failures) == 1
    return report.failures[0]


def test_passing_checks():
    report, rest = check("assert f('aba') == 'aba'\nassert abs(g(1) - 0.3) < 1e-9\nassert none(1) is None\n")
    assert report.ok and (report.passed, report.total) == (3, 3) and report.failures == []
    assert rest == ""


def test_the_classic_case_reports_call_value_and_expectation():
    f = only_failure("assert f('aba') == 'aba'\nassert f('cata') == 'catac'\n")
    assert (f.source, f.call, f.got, f.expected, f.op) == ("assert f('cata') == 'catac'", "f('cata')", "'catatac'", "'catac'", "==")
    assert f.error is None


@pytest.mark.parametrize("test, call, got, expected, op", [
    ("assert 'catac' == f('cata')", "f('cata')", "'catatac'", "'catac'", "=="),
    ("assert f('ab') != 'aba'", "f('ab')", "'aba'", "'aba'", "!="),
    ("assert g(1) < 0.2", "g(1)", "0.30000000000000004", "0.2", "<"),
    ("assert 0.5 <= g(1)", "g(1)", "0.30000000000000004", "0.5", ">="),
    ("assert 1 < g(1) < 2", "g(1)", "0.30000000000000004", "1", ">"),
    ("assert f('ab') in ['x', 'y']", "f('ab')", "'aba'", "['x', 'y']", "in"),
    ("assert 'z' in f('ab')", "f('ab')", "'aba'", "'z'", "contains"),
    ("assert 'a' not in f('ab')", "f('ab')", "'aba'", "'a'", "not contains"),
    ("assert pair() is None", "pair()", "(1, 2)", "None", "is"),
    ("assert none(1) is not None", "none(1)", "None", "None", "is not"),
    ("assert abs(g(1) - 0.31) < 1e-6", "g(1)", "0.30000000000000004", "0.31", "approx"),
    ("assert abs(0.31 - g(1)) <= 1e-6", "g(1)", "0.30000000000000004", "0.31", "approx"),
    ("assert math.isclose(g(1), 0.31, rel_tol=1e-9)", "g(1)", "0.30000000000000004", "0.31", "approx"),
    ("assert none(1)", "none(1)", "None", None, "truthy"),
    ("assert not f('a')", "f('a')", "'a'", None, "falsy"),
    ("assert pair() == [1, 2]", "pair()", "(1, 2)", "[1, 2]", "=="),
])
def test_each_kind_of_assert(test, call, got, expected, op):
    f = only_failure("import math\n" + test)
    assert (f.call, f.got, f.expected, f.op) == (call, got, expected, op)
    assert f.source == test
    if op == "approx":
        assert f.tolerance in ("1e-6", "rel_tol=1e-9")


def test_predicate_call_reports_its_argument():
    f = only_failure("assert isinstance(pair(), list)")
    assert (f.call, f.got, f.predicate, f.predicate_value) == ("pair()", "(1, 2)", "isinstance(pair(), list)", "False")


def test_assert_message_is_kept():
    f = only_failure("assert f('ab') == 'x', 'f must mirror'")
    assert f.message == "f must mirror" and f.got == "'aba'"


def test_each_call_is_evaluated_once():
    candidate = "calls = []\ndef tick():\n    calls.append(1)\n    return len(calls)\n"
    ns, stdout, _ = run(instrument_candidate(candidate), instrument("assert tick() == 5"))
    report, _ = parse_check_output(stdout)
    assert report.failures[0].got == "1" and ns["calls"] == [1]


def test_a_raising_call_reports_the_exception_frames_and_locals():
    f = only_failure("assert f('aba') == 'aba'\nassert divide(3) == 1")
    assert f.call == "divide(3)" and f.got is None and f.expected == "1"
    err = f.error
    assert (err["ename"], err["evalue"]) == ("ZeroDivisionError", "division by zero")
    assert err["function"] == "divide" and err["locals"] == {"x": "3", "y": "6"}
    assert len(err["traceback"]) == 1  # only the candidate's frame: not the tests, not Loopbook's runtime
    assert "return y / (x - x)" in err["traceback"][0] and candidate_filename(CANDIDATE) in err["traceback"][0]


def test_a_missing_function_is_a_name_error_on_the_call():
    f = only_failure("assert solve(1) == 2")
    assert f.call == "solve(1)" and f.error["ename"] == "NameError" and f.error["traceback"] == []


def test_humaneval_style_check_function_names_the_real_function():
    tests = "def check(candidate):\n    assert candidate('aa') == 'aa'\n    assert candidate('cata') == 'catac'\n\ncheck(f)\n"
    report, _ = check(tests)
    assert (report.passed, report.total) == (0, 1)
    f = report.failures[0]
    assert (f.source, f.call, f.got, f.expected) == ("assert f('cata') == 'catac'", "f('cata')", "'catatac'", "'catac'")


def test_humaneval_style_check_with_a_raising_candidate():
    f = only_failure("def check(candidate):\n    assert candidate(2) == 1\n\ncheck(divide)\n")
    assert f.call == "divide(2)" and f.expected == "1" and f.op == "=="
    assert f.error["ename"] == "ZeroDivisionError" and f.error["locals"] == {"x": "2", "y": "4"}


def test_loop_variables_are_shown_as_values():
    f = only_failure("for s, want in [('aa', 'aa'), ('ab', 'zz')]:\n    assert f(s) == want\n")
    assert (f.source, f.call, f.got, f.expected) == ("assert f(s) == want", "f('ab')", "'aba'", "'zz'")


def test_expected_exception_checks_report_their_message():
    tests = "try:\n    f('x')\nexcept ValueError:\n    pass\nelse:\n    raise AssertionError(\"f('x') should raise ValueError\")\n"
    f = only_failure(tests)
    assert f.message == "f('x') should raise ValueError" and f.error is None


def test_stops_at_the_first_failure_and_counts_only_checks():
    tests = "import math\nx = 3\nassert f('aa') == 'aa'\nassert f('ab') == 'x'\nafter = 1\nassert True\n"
    ns, stdout, _ = run(instrument_candidate(CANDIDATE), instrument(tests))
    report, _ = parse_check_output(stdout)
    assert (report.passed, report.total) == (1, 3)
    assert "after" not in ns and ns["x"] == 3  # statements after the failure never ran


def test_namespace_gets_no_helper_names():
    ns, _, _ = run(instrument_candidate(CANDIDATE))
    before = set(ns)
    run(instrument("assert f('aa') == 'aa'\nassert f('ab') == 'x'\n"), ns=ns)
    run(instrument("def check(candidate):\n    assert candidate('ab') == 'x'\ncheck(f)\n"), ns=ns)
    assert set(ns) - before == {"check"}  # the tests' own definition, nothing of ours
    assert not [k for k in ns if "loopbook" in k.lower()]


def test_candidate_output_stays_before_the_report_line():
    candidate = "def loud(x):\n    print('computing', x, end='')\n    return x\n"
    _, stdout, _ = run(instrument_candidate(candidate), instrument("print('start')\nassert loud(2) == 3\n"))
    report, rest = parse_check_output(stdout)
    assert rest == "start\ncomputing 2" and report.failures[0].got == "2"


def test_parse_check_output_without_a_report_and_with_two():
    assert parse_check_output("plain output\n") == (None, "plain output\n")
    one = json.dumps({"passed": 1, "total": 1, "failures": []})
    two = json.dumps({"passed": 0, "total": 2, "failures": [{"source": "assert x", "op": "truthy"}]})
    report, rest = parse_check_output(f"a\n\n__LOOPBOOK_CHECKS__ {one}\nb\n\n__LOOPBOOK_CHECKS__ {two}\n")
    assert rest == "a\nb\n" and report.total == 2 and report.failures[0].source == "assert x"
    assert CheckReport.from_dict(report.to_dict()) == report


def test_tests_that_do_not_parse_are_refused_with_a_clear_error():
    with pytest.raises(ValueError, match="line 2"):
        instrument("assert True\nassert (\n")


def test_empty_tests_report_nothing_to_check():
    report, _ = check("")
    assert (report.passed, report.total, report.failures) == (0, 0, [])


def test_long_and_unprintable_values_are_trimmed():
    candidate = "class Bad:\n    def __repr__(self):\n        raise RuntimeError('no')\n" \
                "def big():\n    return 'x' * 5000\ndef bad():\n    return Bad()\n"
    f = only_failure("assert big() == 'y'", candidate)
    assert len(f.got) <= 300 and f.got.startswith("'xxx") and " ... " in f.got
    f = only_failure("assert bad() == 1", candidate)
    assert "repr() raised RuntimeError" in f.got


def test_system_exit_in_the_candidate_is_a_failure_not_a_crash():
    f = only_failure("assert leave() == 1", "import sys\ndef leave():\n    sys.exit(3)\n")
    assert f.error["ename"] == "SystemExit"


def test_an_interrupt_still_prints_the_report_then_propagates():
    out = io.StringIO()
    ns = {}
    with contextlib.redirect_stdout(out), pytest.raises(KeyboardInterrupt):
        exec(instrument("assert True\nraise KeyboardInterrupt\n"), ns)
    report, _ = parse_check_output(out.getvalue())
    assert report.interrupted and report.passed == 1 and not report.ok


# ---- candidate runs ----

def test_instrument_candidate_keeps_definitions_like_a_direct_run():
    ns, stdout, stderr = run(instrument_candidate("import math\nclass C:\n    pass\ndef f(x):\n    return math.sqrt(x)\nn = f(16)\n"))
    assert ns["n"] == 4.0 and ns["f"].__globals__ is ns and ns["C"].__module__ == "__main__"
    assert set(ns) - {"__builtins__"} == {"__name__", "math", "C", "f", "n"}
    assert stdout == stderr == ""


def test_instrument_candidate_shows_the_last_expression_like_a_cell():
    _, stdout, _ = run(instrument_candidate("x = 20\nx + 1\n"))
    assert stdout == "21\n"


def test_instrument_candidate_reraises_unchanged_and_prints_locals():
    code = "def f(items):\n    total = 0\n    for i in range(len(items) + 1):\n        total += items[i]\n    return total\nf([1, 2])\n"
    ns = {"__name__": "__main__"}
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(IndexError, match="list index out of range") as info:
        exec(instrument_candidate(code), ns)
    info_locals, rest = parse_locals_output(err.getvalue())
    assert rest == ""
    assert info_locals == {"ename": "IndexError", "function": "f", "line": 4,
                           "locals": {"items": "[1, 2]", "total": "3", "i": "2"}}
    # the innermost frame is the candidate's own line, under its own file name
    tb = info.value.__traceback__
    while tb.tb_next:
        tb = tb.tb_next
    assert tb.tb_frame.f_code.co_filename == candidate_filename(code) and tb.tb_lineno == 4
    assert "f" in ns and set(ns) - {"__builtins__"} == {"__name__", "f"}


def test_instrument_candidate_module_level_error_reports_only_names_it_uses():
    ns = {"__name__": "__main__", "unrelated": 99}
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(ZeroDivisionError):
        exec(instrument_candidate("a = 1\nb = 0\nc = a / b\n"), ns)
    info, _ = parse_locals_output(err.getvalue())
    assert info["function"] == "<module>" and info["locals"] == {"a": "1", "b": "0"}


def test_locals_of_failure_skips_library_frames():
    import json as json_module

    ns = {"json": json_module}
    exec(compile("def parse(text):\n    cleaned = text.strip()\n    return json.loads(cleaned)\n", "<solution-test>", "exec"), ns)
    with pytest.raises(json_module.JSONDecodeError) as info:
        ns["parse"](" {bad ")
    assert locals_of_failure(info.value) == {"text": "' {bad '", "cleaned": "'{bad'"}
    report = error_report(info.value)
    assert report["function"] == "parse" and report["line"] == 3
    # user frames only: this test's own frame and parse(), none of json's
    assert len(report["traceback"]) == 2 and "<solution-test>" in report["traceback"][-1]
    assert not any("json" in frame.split("\n")[0] for frame in report["traceback"])


def test_locals_of_failure_with_no_user_frame_is_empty():
    import json as json_module

    with pytest.raises(ValueError) as info:
        json_module.loads("{")
    library_only = info.value.with_traceback(info.value.__traceback__.tb_next)  # drop this test's frame
    assert locals_of_failure(library_only) == {}
    assert locals_of_failure(ValueError("never raised")) == {}
