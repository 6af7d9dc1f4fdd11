"""Selection by execution, with no hidden information: of a round's candidates keep those that compiled, passed
static analysis and the visible checks; run the survivors on shared inputs (the literal calls of the visible checks,
the calls the model wrote for the task (inputs.py), and simple mutations of both; never an expected output); group
them by identical results; pick from the largest group, keeping the greedy candidate (0) unless the evidence against
it is strong (MARGIN)."""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass, field

PROBE_MARK = "\x1e__loopbook_probe__"
MAX_INPUTS = 32
TIMEOUT = "raises timeout"  # a probe call's result when it ran past CALL_TIMEOUT_S
CALL_TIMEOUT_S = 2.0  # one shared input's call; the whole probe is bounded by the loop's exec_timeout
RESULT_CHARS = 2000
# The largest group must outnumber greedy's group by this many before greedy is replaced: with 3 candidates a
# 2-vs-1 split is kept (two sampled candidates agreeing on a wrong answer is common on a small model), 3-vs-1 is not.
MARGIN = 2


def _literal(node: ast.AST):
    return ast.literal_eval(node)


def check_calls(checks: str | None) -> list[tuple[str, list, dict]]:
    """The calls of plain names with literal arguments in the visible checks: (name, args, kwargs)."""
    if not checks:
        return []
    try:
        tree = ast.parse(checks)
    except SyntaxError:
        return []
    out, seen = [], set()
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
            continue
        try:
            args = [_literal(a) for a in node.args]
            kwargs = {kw.arg: _literal(kw.value) for kw in node.keywords if kw.arg}
        except (ValueError, TypeError, SyntaxError, RecursionError):
            continue
        if len(kwargs) != len(node.keywords):
            continue
        key = (node.func.id, repr(args), repr(sorted(kwargs.items())))
        if key not in seen:
            seen.add(key)
            out.append((node.func.id, args, kwargs))
    return out


def _mutations(value) -> list:
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, int):
        return [value + 1, value - 1, 0]
    if isinstance(value, float):
        return [value * 2, -value]
    if isinstance(value, str):
        return [value[::-1], value + value[:1], ""]
    if isinstance(value, (list, tuple)):
        return [type(value)(reversed(value)), value[:-1], type(value)()]
    return []


def _call_source(name: str, args: list, kwargs: dict) -> str:
    parts = [repr(a) for a in args] + [f"{k}={v!r}" for k, v in kwargs.items()]
    return f"{name}({', '.join(parts)})"


def shared_inputs(checks: str | None, written: list[tuple[str, list, dict]] = ()) -> list[str]:
    """Call expressions every survivor is run on: the checks' calls, the calls the model wrote (inputs only), then
    one-argument mutations of each, at most MAX_INPUTS."""
    calls = check_calls(checks) + list(written)
    out = [_call_source(*c) for c in calls]
    for name, args, kwargs in calls:
        for i, a in enumerate(args):
            for m in _mutations(a):
                out.append(_call_source(name, args[:i] + [m] + args[i + 1:], kwargs))
    unique = list(dict.fromkeys(out))
    return unique[:MAX_INPUTS]


def probe_source(code: str, calls: list[str], call_timeout: float = CALL_TIMEOUT_S) -> str:
    """A cell that runs `code` in a copy of the namespace (the user's is left alone) and prints each call's
    result (its repr, or the exception's type) as one marked JSON line. A call that runs past `call_timeout`
    seconds (a model-written input too big for the code) gives 'raises timeout' instead of hanging the probe."""
    return (
        "def __loopbook_probe(__code, __calls):\n"
        "    import json as _json, signal as _signal\n"
        "    _ns = dict(get_ipython().user_ns)\n"
        "    try:\n"
        "        exec(compile(__code, '<candidate>', 'exec'), _ns)\n"
        "    except BaseException as e:\n"
        f"        print({PROBE_MARK!r} + _json.dumps({{'error': type(e).__name__}}))\n"
        "        return\n"
        "    class _Late(BaseException): pass\n"
        "    def _late(*_): raise _Late()\n"
        "    _old = _signal.signal(_signal.SIGALRM, _late)\n"
        "    out = []\n"
        "    try:\n"
        "        for c in __calls:\n"
        "            try:\n"
        f"                _signal.setitimer(_signal.ITIMER_REAL, {call_timeout!r})\n"
        "                try:\n"
        f"                    out.append(repr(eval(c, _ns))[:{RESULT_CHARS}])\n"
        "                finally:\n"
        "                    _signal.setitimer(_signal.ITIMER_REAL, 0)\n"
        "            except _Late:\n"
        f"                out.append({TIMEOUT!r})\n"
        "            except KeyboardInterrupt:\n"
        "                raise\n"
        "            except BaseException as e:\n"
        "                out.append('raises ' + type(e).__name__)\n"
        "    finally:\n"
        "        _signal.signal(_signal.SIGALRM, _old)\n"
        f"    print({PROBE_MARK!r} + _json.dumps(out))\n"
        f"__loopbook_probe({code!r}, {calls!r})\n"
        "del __loopbook_probe\n"
    )


def drop_timeouts(cands: list["Candidate"], results: dict[int, list], inputs: list[str]) -> None:
    """A survivor that ran out of time on an input where another returned drops out: it hangs where others do not.
    An input on which every survivor ran out of time says nothing about them."""
    for i, call in enumerate(inputs):
        late = {k for k, r in results.items() if i < len(r) and r[i] == TIMEOUT}
        if late and len(late) < len(results):
            for c in cands:
                if c.k in late and c.signature is not None:
                    c.signature, c.why = None, f"probe timeout on {call}"


def parse_probe(stdout: str) -> list | dict | None:
    for line in reversed(stdout.split("\n")):  # not splitlines(): it splits at the mark's \x1e too
        if line.startswith(PROBE_MARK):
            try:
                return json.loads(line[len(PROBE_MARK):])
            except ValueError:
                return None
    return None


@dataclass
class Candidate:
    k: int
    survived: bool                # compiled, passed static analysis, ran, passed the visible checks
    signature: str | None = None  # its behaviour on the shared inputs (or its output); None: dropped out
    why: str = ""


@dataclass
class Selection:
    winner: int | None
    groups: list[list[int]] = field(default_factory=list)
    reason: str = ""

    def record_for(self, c: Candidate, inputs: list[str]) -> dict:
        group = next((i for i, g in enumerate(self.groups) if c.k in g), None)
        return {"winner": self.winner, "chosen": c.k == self.winner, "survived": c.survived, "group": group,
                "groups": self.groups, "reason": self.reason, "why": c.why, "n_inputs": len(inputs)}


def choose(cands: list[Candidate], margin: int = MARGIN) -> Selection:
    """Group the survivors by signature; pick from the largest group; keep greedy (k=0) unless outnumbered by
    `margin` or more."""
    by_sig: dict[str, list[int]] = {}
    for c in cands:
        if c.survived and c.signature is not None:
            by_sig.setdefault(c.signature, []).append(c.k)
    groups = sorted(by_sig.values(), key=lambda g: (-len(g), min(g)))
    n = sum(len(g) for g in groups)
    if not groups:
        return Selection(None, [], "no candidate survived the filter")
    largest = groups[0]
    greedy = next((g for g in groups if 0 in g), None)
    if greedy is None:
        why = next((c.why for c in cands if c.k == 0), "") or "greedy did not survive"
        return Selection(min(largest), groups,
                         f"greedy dropped out ({why}); largest group: {len(largest)} of {n} survivors")
    if greedy is not largest and len(largest) - len(greedy) >= margin:
        return Selection(min(largest), groups, f"a group of {len(largest)} outnumbered greedy's group of "
                                               f"{len(greedy)} by {len(largest) - len(greedy)} (margin {margin})")
    if greedy is largest:
        return Selection(0, groups, f"greedy is in the largest group ({len(greedy)} of {n} survivors)")
    return Selection(0, groups, f"greedy kept: the largest group ({len(largest)}) outnumbers greedy's "
                                f"({len(greedy)}) by less than {margin}")
