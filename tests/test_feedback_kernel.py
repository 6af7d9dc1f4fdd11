"""The instrumented snippets behave in a real ipykernel exactly as with a plain exec."""

import contextlib
import io
import threading

import pytest
from jupyter_client.manager import KernelManager

from execfeedback.loop.checks import instrument, instrument_candidate, parse_check_output, parse_locals_output
from execfeedback.loop.feedback import FeedbackConfig, clean_traceback, feedback_message


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    # start_new_kernel, but over IPC: ipykernel 7 warns about plain TCP (DESIGN.md).
    km = KernelManager(kernel_name="python3", transport="ipc", ip=str(tmp_path_factory.mktemp("ipc") / "k"))
    km.start_kernel()
    client = km.client()
    client.start_channels()
    try:
        client.wait_for_ready(timeout=60)
        yield km, client
    finally:
        client.stop_channels()
        km.shutdown_kernel(now=True)


@pytest.fixture
def kc(kernel):
    return kernel[1]


def execute(kc, code):
    out = {"stdout": "", "stderr": "", "error": None, "results": []}

    def hook(msg):
        kind, content = msg["msg_type"], msg["content"]
        if kind == "stream":
            out[content["name"]] += content["text"]
        elif kind == "error":
            out["error"] = content
        elif kind == "execute_result":
            out["results"].append(content["data"]["text/plain"])

    reply = kc.execute_interactive(code, store_history=False, output_hook=hook, timeout=60)
    out["status"] = reply["content"]["status"]
    return out


def reset(kc):
    assert execute(kc, "get_ipython().run_line_magic('reset', '-f')")["status"] == "ok"


def plain_report(candidate, tests):
    ns, out = {"__name__": "__main__"}, io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(instrument_candidate(candidate), ns)
        exec(instrument(tests), ns)
    return parse_check_output(out.getvalue())


CANDIDATE = ("def f(s):\n    return s if s == s[::-1] else s + s[-2::-1]\n\n"
             "def divide(x):\n    y = x * 2\n    return y / (x - x)\n")

CASES = {
    "passing": "assert f('aa') == 'aa'\nassert f('ab') == 'aba'\n",
    "classic": "assert f('aa') == 'aa'\nassert f('cata') == 'catac'\n",
    "raising": "assert divide(3) == 1\n",
    "approx": "assert abs(len(f('ab')) / 7 - 0.5) < 1e-6\n",
    "humaneval": "def check(candidate):\n    assert candidate('aa') == 'aa'\n    assert candidate('cata') == 'catac'\n\ncheck(f)\n",
    "humaneval_raising": "def check(candidate):\n    assert candidate(2) == 1\n\ncheck(divide)\n",
    "loop": "for s, want in [('aa', 'aa'), ('ab', 'zz')]:\n    assert f(s) == want\n",
    "expects_error": "try:\n    f('x')\nexcept ValueError:\n    pass\nelse:\n    raise AssertionError('should raise')\n",
    "printing": "print('hello')\nassert f('ab') == 'x'\n",
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_checks_report_the_same_in_the_kernel(kc, name):
    reset(kc)
    assert execute(kc, instrument_candidate(CANDIDATE))["status"] == "ok"
    run = execute(kc, instrument(CASES[name]))
    assert run["status"] == "ok" and run["error"] is None  # the checks never fail the cell
    in_kernel, rest = parse_check_output(run["stdout"])
    expected, expected_rest = plain_report(CANDIDATE, CASES[name])
    assert in_kernel is not None and in_kernel.to_dict() == expected.to_dict()
    assert rest == expected_rest
    assert in_kernel.ok is (name in ("passing",))


def test_the_classic_case_in_the_kernel(kc):
    reset(kc)
    execute(kc, instrument_candidate(CANDIDATE))
    report, _ = parse_check_output(execute(kc, instrument(CASES["classic"]))["stdout"])
    f = report.failures[0]
    assert (report.passed, report.total, f.call, f.got, f.expected) == (1, 2, "f('cata')", "'catatac'", "'catac'")


def names(kc):
    run = execute(kc, "print(sorted(globals()))")
    return set(eval(run["stdout"]))


def test_kernel_namespace_is_not_polluted(kc):
    reset(kc)
    execute(kc, instrument_candidate(CANDIDATE))
    before = names(kc)
    assert {"f", "divide"} <= before
    for tests in CASES.values():
        execute(kc, instrument(tests))
    assert names(kc) - before == {"check", "s", "want"}  # defined by the tests themselves
    assert not [n for n in names(kc) if "loopbook" in n.lower()]


def test_candidate_definitions_land_in_the_kernel_namespace(kc):
    reset(kc)
    run = execute(kc, instrument_candidate("import math\ndef area(r):\n    return math.pi * r * r\nside = 3\nside * 2\n"))
    assert run["status"] == "ok" and run["results"] == ["6"] and run["stderr"] == ""
    later = execute(kc, "print(round(area(side), 2), area.__module__)")
    assert later["stdout"] == "28.27 __main__\n"


def test_candidate_error_is_the_normal_kernel_error_plus_locals(kc):
    reset(kc)
    code = "def total(items):\n    acc = 0\n    for i in range(len(items) + 1):\n        acc += items[i]\n    return acc\n\ntotal([1, 2])\n"
    run = execute(kc, instrument_candidate(code))
    assert run["status"] == "error"
    assert (run["error"]["ename"], run["error"]["evalue"]) == ("IndexError", "list index out of range")
    info, rest = parse_locals_output(run["stderr"])
    assert rest.strip() == ""
    assert info == {"ename": "IndexError", "function": "total", "line": 4,
                    "locals": {"items": "[1, 2]", "acc": "3", "i": "2"}}
    tb = clean_traceback(run["error"]["traceback"], 5000)
    assert "acc += items[i]" in tb and "total([1, 2])" in tb
    assert "__loopbook" not in tb and "<loopbook>" not in tb and "\x1b" not in tb
    # the function still exists for the next cell, like after a direct run
    assert execute(kc, "print(total.__name__, total.__module__)")["stdout"] == "total __main__\n"


def test_feedback_from_a_real_kernel_error(kc):
    reset(kc)
    code = "import json\n\ndef load(text):\n    cleaned = text.strip()\n    return json.loads(cleaned)\n\nprint('loading')\nload(' {oops ')\n"
    run = execute(kc, instrument_candidate(code))
    info, stderr = parse_locals_output(run["stderr"])
    obs = {"status": "error", "ename": run["error"]["ename"], "evalue": run["error"]["evalue"],
           "traceback": run["error"]["traceback"], "stdout": run["stdout"], "stderr": stderr, "locals": info}
    msg = feedback_message(obs, FeedbackConfig(traceback_chars=700))
    assert msg.startswith("Your code raised JSONDecodeError: Expecting property name")
    assert "\x1b" not in msg and "__loopbook" not in msg
    assert "return json.loads(cleaned)" in msg
    assert "Local values in `load` at line 5 when it failed:\n  text = ' {oops '\n  cleaned = '{oops'" in msg
    assert "Output (last part):\nloading" in msg
    assert msg.endswith("Return the whole corrected code in one ```python block.")
    # json's own frames are cut to their first line: the model did not write that code
    assert "def decode(self" not in msg


def test_an_assert_in_the_answers_own_code_says_what_it_computed(kc):
    """Seen with the coder model on HumanEval: its own test asserts failed and it was told only 'AssertionError'."""
    reset(kc)
    code = ("def vowels_count(s):\n    return sum(c in 'aeiou' for c in s.lower())\n\n"
            "assert vowels_count('abcde') == 2\nassert vowels_count('ACEDY') == 3\n")
    run = execute(kc, instrument_candidate(code))
    assert run["status"] == "error" and run["error"]["ename"] == "AssertionError"
    info, _ = parse_locals_output(run["stderr"])
    assert info["check"]["call"] == "vowels_count('ACEDY')"
    assert (info["check"]["got"], info["check"]["expected"]) == ("2", "3")
    obs = {"status": "error", "ename": "AssertionError", "evalue": "", "traceback": run["error"]["traceback"],
           "locals": info}
    msg = feedback_message(obs)
    assert msg.startswith("Your code raised AssertionError in an assert of your own code:\n"
                          "    assert vowels_count('ACEDY') == 3\n`vowels_count('ACEDY')` returned 2, expected 3")
    # an assert inside a function the answer calls is explained too; other errors are not touched
    reset(kc)
    code = "def check():\n    assert len('abc') == 4, 'length'\n\ncheck()\n"
    info, _ = parse_locals_output(execute(kc, instrument_candidate(code))["stderr"])
    assert info["check"]["got"] == "3" and info["check"]["expected"] == "4"
    reset(kc)
    info, _ = parse_locals_output(execute(kc, instrument_candidate("x = 1\n1 / 0\n"))["stderr"])
    assert "check" not in info


def test_an_interrupted_candidate_reports_where_it_was_looping(kernel, tmp_path):
    km, kc = kernel
    reset(kc)
    flag = tmp_path / "looping"
    code = (f"def spin(n, flag={str(flag)!r}):\n    open(flag, 'w').close()\n    steps = 0\n"
            "    while n > 0:\n        steps += 1\n    return steps\n\nspin(3)\n")

    def interrupt_once_looping():
        for _ in range(3000):  # the candidate creates the flag file right before its endless loop
            if flag.exists():
                break
            threading.Event().wait(0.01)
        km.interrupt_kernel()

    threading.Thread(target=interrupt_once_looping, daemon=True).start()
    run = execute(kc, instrument_candidate(code))
    assert run["error"]["ename"] == "KeyboardInterrupt"
    info, _ = parse_locals_output(run["stderr"])
    assert info["function"] == "spin" and info["locals"]["n"] == "3"
    msg = feedback_message({"status": "timeout", "timeout_s": 2, "traceback": run["error"]["traceback"], "locals": info})
    assert msg.startswith("Your code ran longer than 2 s and was stopped.")
    assert "Local values in `spin` at line" in msg and "  n = 3" in msg and "while n > 0" in msg
