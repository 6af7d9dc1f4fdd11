"""Eval problems: one JSON object per line, loaded with per-line errors instead of a crash.

Problem file format (JSON Lines, UTF-8, one problem per line; blank lines are skipped):

    {"id": "digit_sum",
     "prompt": "def digit_sum(n: int) -> int:\\n    \\"\\"\\"Return the sum of the decimal digits of n.\\"\\"\\"\\n",
     "entry_point": "digit_sum",
     "visible_tests": "assert digit_sum(123) == 6\\n",
     "hidden_tests": "assert digit_sum(-123) == 6\\nassert digit_sum(10 ** 20) == 1\\n"}

- `id` (string, required): unique in the file; results, traces and resume are keyed by it.
- `prompt` (string, required): the task, usually a signature and a docstring. The model is asked to
  "Write this Python function" with the prompt in a code block.
- `entry_point` (string, optional): the name of the function the tests call.
- `visible_tests` (string, required, may be empty): Python shown to the model with the prompt and run
  after each attempt; a failing visible test is fed back ("`f(x)` returned 1, expected 2").
- `hidden_tests` (string, required): Python run only to score an attempt, in a fresh namespace with the
  attempt's code; never shown to the model and never fed back.
Tests are plain `assert` statements or a HumanEval-style `def check(candidate): ...` followed by
`check(entry_point)`. Other keys are kept in `Problem.extra`. A malformed line (bad JSON, a
missing field, tests that do not parse, a duplicate id) is reported with its line number and skipped;
the other problems run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

REQUIRED = ("id", "prompt", "visible_tests", "hidden_tests")
SHIPPED = Path(__file__).resolve().parent / "problem_sets" / "loopbook-30.jsonl"


@dataclass(frozen=True)
class Problem:
    """One function-writing task with its visible and hidden tests."""

    id: str
    prompt: str
    visible_tests: str
    hidden_tests: str
    entry_point: str | None = None
    extra: dict = field(default_factory=dict, compare=False)
    line: int = field(default=0, compare=False)  # where it was read from, for messages


@dataclass(frozen=True)
class LineError:
    """A line of a problem file that could not be loaded, and why."""

    line: int
    message: str
    path: str = ""

    def __str__(self) -> str:
        return f"{self.path or 'problems'}:{self.line}: {self.message}"


def load_problems(path: str | Path = SHIPPED) -> tuple[list[Problem], list[LineError]]:
    """Every well-formed problem in the file, and one LineError per malformed line (the rest still load)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no problem file at {path}; pass a .jsonl file with one problem per line")
    problems: list[Problem] = []
    errors: list[LineError] = []
    seen: dict[str, int] = {}
    with path.open(encoding="utf-8-sig") as fh:
        for n, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                problem = parse_problem(raw, line=n)
            except ValueError as e:
                errors.append(LineError(n, str(e), str(path)))
                continue
            if problem.id in seen:
                errors.append(LineError(n, f"duplicate id {problem.id!r} (first on line {seen[problem.id]}); "
                                           "give each problem its own id", str(path)))
                continue
            seen[problem.id] = n
            problems.append(problem)
    return problems, errors


def parse_problem(text: str, *, line: int = 0) -> Problem:
    """One problem from one JSON line; ValueError says what is wrong and how to fix it."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg} at column {e.colno}); each line must be one JSON object") from None
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    missing = [k for k in REQUIRED if k not in data]
    if missing:
        raise ValueError(f"missing field(s) {', '.join(missing)}; every problem needs {', '.join(REQUIRED)}")
    for key in REQUIRED:
        if not isinstance(data[key], str):
            raise ValueError(f"field {key} must be a string, got {type(data[key]).__name__}")
    if not data["id"].strip():
        raise ValueError("field id is empty")
    entry = data.get("entry_point")
    if entry is not None and (not isinstance(entry, str) or not entry.isidentifier()):
        raise ValueError(f"field entry_point must be a Python name or null, got {entry!r}")
    for key in ("visible_tests", "hidden_tests"):
        try:
            compile(data[key], key, "exec", dont_inherit=True)
        except SyntaxError as e:
            raise ValueError(f"{key} is not valid Python (line {e.lineno}: {e.msg})") from None
    extra = {k: v for k, v in data.items() if k not in (*REQUIRED, "entry_point")}
    return Problem(id=data["id"], prompt=data["prompt"], visible_tests=data["visible_tests"],
                   hidden_tests=data["hidden_tests"], entry_point=entry, extra=extra, line=line)


def task_message(problem: Problem, *, show_tests: bool = True) -> str:
    """A plain first user turn for a problem: the task, and the visible tests when asked."""
    text = "Write this Python function.\n\n```python\n" + problem.prompt.rstrip() + "\n```"
    if show_tests and problem.visible_tests.strip():
        text += "\n\nIt must pass these tests:\n\n```python\n" + problem.visible_tests.rstrip() + "\n```"
    return text + "\n\nReturn the whole code in one ```python block."
