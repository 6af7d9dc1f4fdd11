"""Values and functions of a real kernel for prompts: `$`name`` summaries and `&`fn`` tools."""

import json

import pytest

from kernels.namespace import name_problem
from kernelhelpers import pool_session

SETUP = '''
import time, signal
big_list = list(range(100_000))
big_dict = {f"key{i}": i for i in range(10_000)}
long_text = "lorem ipsum " * 10_000
small = 42
class BadRepr:
    def __repr__(self):
        raise ValueError("repr is broken")
class SlowRepr:
    def __repr__(self):
        time.sleep(100)
        return "never"
bad, slow = BadRepr(), SlowRepr()

def area(w: float, h: float = 1.0, *, unit: str = "m") -> str:
    """Area of a w by h rectangle.

    Args:
        w: the width
        h: the height
    """
    return f"{w * h} {unit}^2"

def plain(a, b=None, *rest, **options):
    return [a, b, rest, options]

def only_pos(x: int, /, y: int) -> int:
    return x - y

def shout(word):
    print("shouting", word)
    return word.upper()

def boom(n: int):
    return 1 / n

def hang():
    time.sleep(100)

def huge():
    return "z" * 10_000_000

def huge_list():
    return list(range(10**6))

def prints_a_lot():
    print("p" * 10_000_000)
    return "ok"

def deaf(seconds: float):
    # Blocks the per-call alarm, so only the execution's own timeout (an interrupt) can stop it.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
    try:
        time.sleep(seconds)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGALRM})
'''


@pytest.fixture(scope="module")
def lp():
    yield from pool_session(("ns", SETUP))


def variables(lp, names, **kw):
    return {n.name: n for n in lp.run(lp.pool.variables("ns", names, **kw))}


def user_names(lp):
    """The user's names and the execution count, read by cells that add neither."""
    code = "print(sorted(get_ipython().user_ns), get_ipython().execution_count)"
    return lp.run(lp.pool.execute("ns", code, store_history=False)).stdout


# -- $`name` ---------------------------------------------------------------------------------------


def test_a_dataframe_shows_shape_dtypes_and_head(lp):
    pytest.importorskip("pandas")
    lp.run(lp.pool.execute("ns", "import pandas as pd\n"
                                 "df = pd.DataFrame({'city': ['Oslo', 'Lima'] * 500, 'temp': range(1000)})"))
    note = variables(lp, ["df"])["df"]
    assert note.status == "ok" and note.type == "pandas.DataFrame"
    assert note.text.startswith("pandas DataFrame, 1,000 rows x 2 columns\n")
    assert "city (" in note.text and "temp (int64)" in note.text
    head = note.text.split("head:\n")[1].splitlines()
    assert len(head) == 6 and "Oslo" in head[1] and head[5].split()[0] == "4"
    assert variables(lp, ["df.shape"])["df.shape"].text == "(1000, 2)"


def test_long_containers_and_text_give_length_and_a_few_items(lp):
    notes = variables(lp, ["big_list", "big_dict", "long_text", "small"], max_chars=500)
    assert notes["big_list"].text == "list of 100,000 items: [0, 1, 2, 3, 4, 5, 6, 7, ...]"
    assert notes["big_dict"].text.startswith("dict of 10,000 items: {'key0': 0, 'key1': 1,")
    assert notes["long_text"].text.startswith("str of 120,000 characters: 'lorem ipsum lorem")
    assert all(len(n.text) <= 500 for n in notes.values())
    assert (notes["small"].status, notes["small"].type, notes["small"].text) == ("ok", "int", "42")


def test_a_missing_name_gets_a_clear_note(lp):
    notes = variables(lp, ["nowhere", "big_list.nope", "2bad", ""])
    assert notes["nowhere"].status == "missing" and "`nowhere` is not defined" in notes["nowhere"].text
    assert notes["big_list.nope"].status == "missing" and "has no attribute `nope`" in notes["big_list.nope"].text
    assert notes["2bad"].status == "invalid" and notes[""].status == "invalid"


def test_a_broken_or_hanging_repr_breaks_neither_the_kernel_nor_the_other_names(lp):
    notes = lp.run(lp.pool.variables("ns", ["bad", "small", "slow", "big_list"], timeout_per_name=1.0))
    assert [n.status for n in notes] == ["error", "ok", "timeout", "ok"]
    assert "ValueError: repr is broken" in notes[0].text
    assert "took over 1 s" in notes[2].text and notes[2].type == "__main__.SlowRepr"
    assert lp.pool.state("ns") == "idle" and lp.run(lp.pool.execute("ns", "print(small)")).stdout == "42\n"


def test_summaries_leave_no_names_and_no_history_behind(lp):
    before = user_names(lp)
    variables(lp, ["big_list", "small", "nowhere", "bad"])
    lp.run(lp.pool.tool_specs("ns", ["area"]))
    lp.run(lp.pool.call_tool("ns", "area", {"w": 2}))
    assert user_names(lp) == before and "'_i'" in before


# -- &`fn` ------------------------------------------------------------------------------------------


def test_a_tool_schema_from_signature_annotations_defaults_and_docstring(lp):
    (spec,) = lp.run(lp.pool.tool_specs("ns", ["area"]))
    assert spec.status == "ok"
    assert spec.spec["name"] == "area" and spec.spec["description"].startswith("Area of a w by h rectangle.")
    assert spec.spec["parameters"] == {
        "type": "object",
        "properties": {
            "w": {"type": "number", "description": "the width"},
            "h": {"type": "number", "description": "the height", "default": 1.0},
            "unit": {"type": "string", "default": "m"},
        },
        "required": ["w"],
        "additionalProperties": False,
    }
    json.dumps(spec.to_dict())


def test_schemas_without_annotations_and_with_odd_parameters(lp):
    plain, pos, small, nowhere = lp.run(lp.pool.tool_specs("ns", ["plain", "only_pos", "small", "nowhere"]))
    params = plain.spec["parameters"]
    assert params["properties"] == {"a": {}, "b": {"default": None}} and params["required"] == ["a"]
    assert "additionalProperties" not in params  # **options takes any other name
    assert plain.spec["description"].startswith("The function plain(a, b=None")
    assert pos.spec["parameters"]["properties"] == {"x": {"type": "integer"}, "y": {"type": "integer"}}
    assert small.status == "error" and "not a function" in small.text
    assert nowhere.status == "missing"


def test_calling_a_tool_returns_its_trimmed_result(lp):
    r = lp.run(lp.pool.call_tool("ns", "area", {"w": 2, "h": 3, "unit": "cm"}))
    assert (r.status, r.text, r.type) == ("ok", "6 cm^2", "str")
    r = lp.run(lp.pool.call_tool("ns", "only_pos", '{"x": 5, "y": 2}'))
    assert (r.status, r.text, r.type) == ("ok", "3", "int")
    r = lp.run(lp.pool.call_tool("ns", "shout", {"word": "hey"}))
    assert (r.text, r.stdout) == ("HEY", "shouting hey\n")


def test_a_tool_that_raises_gives_the_error_text(lp):
    r = lp.run(lp.pool.call_tool("ns", "boom", {"n": 0}))
    assert r.status == "error" and r.type == "ZeroDivisionError"
    assert r.text.startswith("boom raised ZeroDivisionError: division by zero") and "return 1 / n" in r.text


def test_bad_arguments_come_back_as_text(lp):
    r = lp.run(lp.pool.call_tool("ns", "area", {"w": 1, "depth": 2}))
    assert r.status == "bad_arguments" and "unexpected keyword argument 'depth'" in r.text and "area(w: float" in r.text
    r = lp.run(lp.pool.call_tool("ns", "area", {}))
    assert r.status == "bad_arguments" and "missing a required argument: 'w'" in r.text
    r = lp.run(lp.pool.call_tool("ns", "boom", {"n": "three"}))  # a wrong type that fails in the tool
    assert r.status == "error" and "TypeError" in r.text
    assert lp.run(lp.pool.call_tool("ns", "area", "{not json")).status == "bad_arguments"
    assert "JSON object" in lp.run(lp.pool.call_tool("ns", "area", "[1, 2]")).text
    assert lp.run(lp.pool.call_tool("ns", "nowhere", {})).status == "missing"


def test_a_hanging_tool_times_out_and_the_kernel_keeps_its_state(lp):
    r = lp.run(lp.pool.call_tool("ns", "hang", {}, timeout=1.0))
    assert r.status == "timeout" and "ran past its 1 s time limit" in r.text
    assert lp.pool.state("ns") == "idle" and lp.run(lp.pool.execute("ns", "print(small)")).stdout == "42\n"


def test_a_tool_that_ignores_its_alarm_is_interrupted_by_the_execution_timeout(lp):
    r = lp.run(lp.pool.call_tool("ns", "deaf", {"seconds": 60}, timeout=1.0))
    assert r.status == "timeout" and "interrupted" in r.text
    assert lp.run(lp.pool.execute("ns", "print(small)")).stdout == "42\n"


def test_huge_results_and_huge_prints_are_trimmed(lp):
    r = lp.run(lp.pool.call_tool("ns", "huge", {}, max_chars=1_000))
    assert r.status == "ok" and len(r.text) <= 1_000 and "characters omitted" in r.text and r.text.startswith("zzz")
    r = lp.run(lp.pool.call_tool("ns", "huge_list", {}))
    assert r.text == "list of 1,000,000 items: [0, 1, 2, 3, 4, 5, 6, 7, ...]"
    r = lp.run(lp.pool.call_tool("ns", "prints_a_lot", {}))
    assert r.text == "ok" and len(r.stdout) < 2_200 and r.stdout.startswith("ppp")


def test_name_checks():
    assert name_problem("df") is None and name_problem("model.config.n_layers") is None
    assert name_problem("a b") and name_problem("x[0]") and name_problem("class") and name_problem(3)
