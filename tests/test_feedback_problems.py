"""The problem loader, and the shipped problem set checked against reference (and deliberately wrong) solutions."""

import contextlib
import csv
import datetime
import io
import json
import math
import re
from decimal import ROUND_HALF_UP, Decimal

import pytest

from execfeedback.loop.checks import instrument, parse_check_output
from execfeedback.eval.problems import SHIPPED, LineError, Problem, load_problems, parse_problem, task_message

# ---- reference solutions, one per shipped problem ----


def count_vowels(text):
    return sum(c in "aeiou" for c in text.lower())


def digit_sum(n):
    return sum(int(c) for c in str(abs(n)))


def chunk(items, size):
    if size < 1:
        raise ValueError("size must be at least 1")
    return [items[i:i + size] for i in range(0, len(items), size)]


def second_largest(nums):
    distinct = sorted(set(nums))
    return distinct[-2] if len(distinct) >= 2 else None


def run_length_encode(text):
    out = []
    for m in re.finditer(r"(.)\1*", text, re.S):
        run = m.group(0)
        out.append(run[0] + (str(len(run)) if len(run) > 1 else ""))
    return "".join(out)


def round_half_up(x, ndigits=0):
    return float(Decimal(repr(x)).quantize(Decimal(1).scaleb(-ndigits), rounding=ROUND_HALF_UP))


def is_palindrome(text):
    kept = [c for c in text.casefold() if c.isalnum()]
    return kept == kept[::-1]


def word_frequencies(text):
    counts = {}
    word = []
    for c in text.lower() + " ":
        if c.isalpha():
            word.append(c)
        elif word:
            w = "".join(word)
            counts[w] = counts.get(w, 0) + 1
            word = []
    return sorted(counts.items(), key=lambda kv: -kv[1])


def merge_intervals(intervals):
    merged = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def parse_duration(text):
    m = re.fullmatch(r"(?:([0-9]+)h)?(?:([0-9]+)m)?(?:([0-9]+)s)?", text)
    if not m or not any(m.groups()):
        raise ValueError(f"not a duration: {text!r}")
    h, mi, s = (int(g or 0) for g in m.groups())
    return h * 3600 + mi * 60 + s


def median(values):
    if not values:
        raise ValueError("median of an empty list")
    s = sorted(values)
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2


def camel_to_snake(name):
    s = re.sub(r"(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", s).lower()


def rotate_list(items, k):
    if not items:
        return []
    k %= len(items)
    return items[-k:] + items[:-k] if k else list(items)


def flatten(nested):
    out = []
    for x in nested:
        out.extend(flatten(x) if isinstance(x, (list, tuple)) else [x])
    return out


def format_bytes(n):
    if abs(n) < 1024:
        return f"{n} B"
    value = n
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}"


def balanced(text):
    pairs = {")": "(", "]": "[", "}": "{"}
    stack = []
    for c in text:
        if c in "([{":
            stack.append(c)
        elif c in pairs:
            if not stack or stack.pop() != pairs[c]:
                return False
    return not stack


def nth_prime(n):
    if n < 1:
        raise ValueError("n must be at least 1")
    found, candidate = 0, 1
    while found < n:
        candidate += 1
        if all(candidate % p for p in range(2, math.isqrt(candidate) + 1)):
            found += 1
    return candidate


def dedupe(items):
    out = []
    for x in items:
        if x not in out:
            out.append(x)
    return out


def top_k(scores, k):
    if k <= 0:
        return []
    return sorted(scores, key=lambda name: (-scores[name], name))[:k]


def caesar(text, shift):
    out = []
    for c in text:
        if "a" <= c <= "z" or "A" <= c <= "Z":
            base = ord("a") if c.islower() else ord("A")
            c = chr(base + (ord(c) - base + shift) % 26)
        out.append(c)
    return "".join(out)


def int_to_roman(n):
    if not 1 <= n <= 3999:
        raise ValueError("n must be within 1..3999")
    table = [(1000, "M"), (900, "CM"), (500, "D"), (400, "CD"), (100, "C"), (90, "XC"), (50, "L"), (40, "XL"),
             (10, "X"), (9, "IX"), (5, "V"), (4, "IV"), (1, "I")]
    out = []
    for value, letters in table:
        count, n = divmod(n, value)
        out.append(letters * count)
    return "".join(out)


def moving_average(values, window):
    if window < 1:
        raise ValueError("window must be at least 1")
    return [sum(values[i:i + window]) / window for i in range(len(values) - window + 1)]


def longest_common_prefix(words):
    if not words:
        return ""
    prefix = words[0]
    for w in words[1:]:
        while not w.startswith(prefix):
            prefix = prefix[:-1]
    return prefix


def group_anagrams(words):
    groups = {}
    for w in words:
        groups.setdefault("".join(sorted(w.lower())), []).append(w)
    return list(groups.values())


def parse_csv_line(line):
    return next(csv.reader([line])) if line else [""]


def add_months(date, months):
    d = datetime.date.fromisoformat(date)
    index = d.year * 12 + (d.month - 1) + months
    year, month = divmod(index, 12)
    month += 1
    days = [31, 29 if year % 4 == 0 and (year % 100 or year % 400 == 0) else 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]
    return datetime.date(year, month, min(d.day, days[month - 1])).isoformat()


def sum_of_multiples(limit, factors):
    return sum(n for n in range(1, limit) if any(f and n % f == 0 for f in factors))


def spiral_order(matrix):
    rows = [list(r) for r in matrix]
    out = []
    while rows and rows[0]:
        out += rows.pop(0)
        rows = [list(r) for r in zip(*rows)][::-1]
    return out


def wrap_text(text, width):
    lines = []
    for word in text.split():
        if lines and len(lines[-1]) + 1 + len(word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines


def normalize_path(path):
    absolute = path.startswith("/")
    parts = []
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if parts and parts[-1] != "..":
                parts.pop()
            elif not absolute:
                parts.append("..")
        else:
            parts.append(part)
    text = "/".join(parts)
    return "/" + text if absolute else text or "."


REFERENCES = {f.__name__: f for f in [
    count_vowels, digit_sum, chunk, second_largest, run_length_encode, round_half_up, is_palindrome,
    word_frequencies, merge_intervals, parse_duration, median, camel_to_snake, rotate_list, flatten,
    format_bytes, balanced, nth_prime, dedupe, top_k, caesar, int_to_roman, moving_average,
    longest_common_prefix, group_anagrams, parse_csv_line, add_months, sum_of_multiples, spiral_order,
    wrap_text, normalize_path]}

# ---- deliberately wrong solutions: the traps a small model falls into first ----
# Each maps to (source, does it pass the visible tests?). Those that pass the visible tests show
# where only the hidden tests catch the mistake; the others are where feedback rounds matter.
WRONG = {
    "round_half_up": ("def round_half_up(x, ndigits=0):\n    return float(round(x, ndigits))\n", False),
    "second_largest": ("def second_largest(nums):\n    s = sorted(nums)\n    return s[-2] if len(s) > 1 else None\n", False),
    "rotate_list": ("def rotate_list(items, k):\n    k %= len(items)\n    return items[-k:] + items[:-k]\n", False),
    "dedupe": ("def dedupe(items):\n    return list(dict.fromkeys(items))\n", False),
    "word_frequencies": ("from collections import Counter\n"
                         "def word_frequencies(text):\n"
                         "    return sorted(Counter(text.lower().split()).items(), key=lambda kv: (-kv[1], kv[0]))\n", False),
    "normalize_path": ("import posixpath\n"
                       "def normalize_path(path):\n    return posixpath.normpath(path)\n", True),
    "wrap_text": ("import textwrap\ndef wrap_text(text, width):\n    return textwrap.wrap(text, width)\n", True),
    "moving_average": ("def moving_average(values, window):\n"
                       "    return [sum(values[i:i + window]) / window for i in range(len(values) - window)]\n", False),
    "median": ("def median(values):\n    values.sort()\n    n = len(values)\n"
               "    return values[n // 2] if n % 2 else (values[n // 2 - 1] + values[n // 2]) / 2\n", True),
    "top_k": ("def top_k(scores, k):\n    return sorted(scores, key=scores.get, reverse=True)[:k]\n", False),
    "is_palindrome": ("import re\ndef is_palindrome(text):\n"
                      "    s = re.sub(r'[^a-z0-9]', '', text.lower())\n    return s == s[::-1]\n", True),
    "group_anagrams": ("def group_anagrams(words):\n    groups = {}\n"
                       "    for w in words:\n        groups.setdefault(''.join(sorted(w)), []).append(w)\n"
                       "    return list(groups.values())\n", True),
    "caesar": ("def caesar(text, shift):\n"
               "    return ''.join(chr((ord(c) - 97 + shift) % 26 + 97) if c.isalpha() else c for c in text)\n", False),
    "nth_prime": ("def nth_prime(n):\n    primes = [p for p in range(2, 10000) if all(p % d for d in range(2, p))]\n"
                  "    return primes[n]\n", False),
    "spiral_order": ("def spiral_order(matrix):\n    out = []\n    if not matrix:\n        return out\n"
                     "    top, bottom, left, right = 0, len(matrix) - 1, 0, len(matrix[0]) - 1\n"
                     "    while top <= bottom and left <= right:\n"
                     "        out += matrix[top][left:right + 1]\n"
                     "        out += [matrix[r][right] for r in range(top + 1, bottom + 1)]\n"
                     "        out += matrix[bottom][left:right][::-1]\n"
                     "        out += [matrix[r][left] for r in range(bottom - 1, top, -1)]\n"
                     "        top, bottom, left, right = top + 1, bottom - 1, left + 1, right - 1\n"
                     "    return out\n", False),
    "add_months": ("import datetime\ndef add_months(date, months):\n    d = datetime.date.fromisoformat(date)\n"
                   "    m = d.month + months\n    y = d.year + m // 12\n    m = m % 12\n"
                   "    return d.replace(year=y, month=m).isoformat()\n", False),
    "sum_of_multiples": ("def sum_of_multiples(limit, factors):\n"
                         "    return sum(sum(range(f, limit, f)) for f in factors)\n", False),
}


def run_tests(solution_ns: dict, tests: str):
    """Run instrumented tests in the given namespace with a plain exec; return the parsed report."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(instrument(tests), solution_ns)
    report, _ = parse_check_output(out.getvalue())
    assert report is not None, out.getvalue()
    return report


@pytest.fixture(scope="module")
def shipped():
    problems, errors = load_problems(SHIPPED)
    assert errors == []
    return problems


def test_shipped_set_shape(shipped):
    assert len(shipped) == 30
    assert len({p.id for p in shipped}) == 30
    for p in shipped:
        assert p.entry_point and f"def {p.entry_point}(" in p.prompt
        assert '"""' in p.prompt  # a docstring says what to do
        visible = p.visible_tests.count("assert ")
        hidden = p.hidden_tests.count("assert ") + p.hidden_tests.count("raise AssertionError")
        assert 2 <= visible <= 3, p.id
        assert 5 <= hidden <= 10, p.id
    assert set(REFERENCES) == {p.id for p in shipped}


@pytest.mark.parametrize("pid", sorted(REFERENCES))
def test_reference_passes_visible_and_hidden(shipped, pid):
    problem = next(p for p in shipped if p.id == pid)
    for tests in (problem.visible_tests, problem.hidden_tests):
        ns = {"__name__": "__main__", problem.entry_point: REFERENCES[pid]}
        report = run_tests(ns, tests)
        assert report.ok, (pid, report.failures)
        assert report.total >= 1


@pytest.mark.parametrize("pid", sorted(WRONG))
def test_wrong_solution_fails_hidden(shipped, pid):
    problem = next(p for p in shipped if p.id == pid)
    source, passes_visible = WRONG[pid]
    ns = {"__name__": "__main__"}
    exec(source, ns)
    assert not run_tests(dict(ns), problem.hidden_tests).ok
    assert run_tests(dict(ns), problem.visible_tests).ok is passes_visible


def test_task_message_shows_prompt_and_visible_tests_only(shipped):
    p = next(p for p in shipped if p.id == "median")
    text = task_message(p)
    assert p.prompt.strip() in text and p.visible_tests.strip() in text
    assert "data = [9, 2, 7]" not in text  # hidden tests stay hidden
    assert "```python" in task_message(p, show_tests=False) and p.visible_tests.strip() not in task_message(p, show_tests=False)


GOOD = {"id": "x", "prompt": "def x():\n    pass\n", "visible_tests": "assert x() is None\n", "hidden_tests": "assert True\n"}


def test_malformed_lines_are_reported_and_the_rest_load(tmp_path):
    lines = [
        json.dumps(GOOD),                                   # 1 fine
        "{not json",                                        # 2
        json.dumps({k: v for k, v in GOOD.items() if k != "hidden_tests"} | {"id": "y"}),  # 3 missing field
        json.dumps(GOOD | {"id": "z", "prompt": 5}),        # 4 wrong type
        "",                                                 # 5 blank: skipped silently
        json.dumps(GOOD),                                   # 6 duplicate id
        json.dumps(GOOD | {"id": "w", "visible_tests": "assert ("}),  # 7 tests do not parse
        json.dumps([1, 2]),                                 # 8 not an object
        json.dumps(GOOD | {"id": "v", "entry_point": "not a name"}),  # 9 bad entry point
        json.dumps(GOOD | {"id": "u", "entry_point": None, "difficulty": "easy"}),  # 10 fine, extra kept
    ]
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    problems, errors = load_problems(path)
    assert [p.id for p in problems] == ["x", "u"]
    assert problems[1].extra == {"difficulty": "easy"} and problems[1].entry_point is None
    by_line = {e.line: e.message for e in errors}
    assert sorted(by_line) == [2, 3, 4, 6, 7, 8, 9]
    assert "not valid JSON" in by_line[2]
    assert "hidden_tests" in by_line[3]
    assert "prompt must be a string" in by_line[4]
    assert "duplicate id 'x'" in by_line[6] and "line 1" in by_line[6]
    assert "visible_tests is not valid Python" in by_line[7]
    assert "JSON object" in by_line[8]
    assert "entry_point" in by_line[9]
    assert str(errors[0]).startswith(f"{path}:2: ")


def test_missing_file_says_what_to_pass(tmp_path):
    with pytest.raises(FileNotFoundError, match="jsonl"):
        load_problems(tmp_path / "nope.jsonl")


def test_parse_problem_roundtrip():
    p = parse_problem(json.dumps(GOOD | {"entry_point": "x"}), line=3)
    assert p == Problem(id="x", prompt=GOOD["prompt"], visible_tests=GOOD["visible_tests"],
                        hidden_tests=GOOD["hidden_tests"], entry_point="x")
    assert p.line == 3
    assert isinstance(LineError(1, "m"), LineError)
