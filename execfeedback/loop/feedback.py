"""The user turn sent back to the model after a failed attempt, and the signature that spots a repeat.

An observation (`obs`) is a dict: {"status": "error" | "timeout" | "died" | "syntax_error" |
"no_code" | "check_failed", "ename", "evalue", "traceback": [lines, ANSI allowed], "stdout",
"stderr", "checks": CheckReport or its dict, "locals": dict, "timeout_s"}. Missing keys are fine.
Measured here (DESIGN.md): a bare traceback fixed nothing, so a failing check says what it computed.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields, replace
from functools import partial

from fastcore.ansi import strip_ansi

from dialog.render import trim_middle

from .checks import CheckFailure, CheckReport, parse_check_output, parse_locals_output

STATUSES = ("error", "timeout", "died", "syntax_error", "no_code", "check_failed")

# Library frames are cut to their first line: the model did not write that code.
_LIBRARY_FRAME = re.compile(r"site-packages|dist-packages|[/\\]lib[/\\]python3\.\d+[/\\]")


@dataclass
class FeedbackConfig:
    """Budgets and wording of feedback turns. Templates use str.format fields named in each default."""

    traceback_chars: int = 1500
    stdout_tail_chars: int = 800
    stderr_tail_chars: int = 400
    locals_chars: int = 600
    include_traceback: bool = True
    include_locals: bool = True
    include_check_values: bool = True
    error_template: str = "Your code raised {ename}: {evalue}"
    check_failed_template: str = "Your code ran, but a check failed ({passed} of {total} passed):"
    timeout_template: str = ("Your code ran longer than {timeout} s and was stopped. "
                             "Look for a loop that never ends or an algorithm that is too slow.")
    timeout_unknown_template: str = ("Your code ran too long and was stopped. "
                                     "Look for a loop that never ends or an algorithm that is too slow.")
    died_template: str = "The Python process running your code died (it crashed or ran out of memory)."
    syntax_error_template: str = "Your code has a syntax error at line {lineno}:"
    no_code_template: str = "Your reply had no code block."
    cut_off_template: str = ("Your reply reached the length limit ({max_tokens} tokens) and was cut off, so the "
                             "code is incomplete. Write a shorter solution and do not repeat yourself.")
    instruction: str = "Return the whole corrected code in one ```python block."
    no_code_instruction: str = "Return the whole code in one ```python block."

    @classmethod
    def from_dict(cls, d: dict | None) -> "FeedbackConfig":
        """Build from a dict (a dialog setting, a CLI JSON); unknown keys are an error that lists the known ones."""
        d = dict(d or {})
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ValueError(f"unknown feedback setting(s) {', '.join(unknown)}; known: {', '.join(known)}")
        for name, value in d.items():
            want = type(getattr(cls(), name))
            if want is int and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"feedback setting {name} must be a whole number >= 0, got {value!r}")
            if want is not int and not isinstance(value, want):
                raise ValueError(f"feedback setting {name} must be a {want.__name__}, got {value!r}")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)


def feedback_message(obs: dict, config: FeedbackConfig = FeedbackConfig()) -> str:
    """The user turn that tells the model what went wrong, ending with what to send back."""
    status = obs.get("status") or "error"
    if status not in STATUSES:
        raise ValueError(f"unknown status {status!r}; expected one of {', '.join(STATUSES)}")
    parts = _STATUS_PARTS[status](obs, config)
    if obs.get("cut_off") and status in ("syntax_error", "no_code"):
        # The error is only where the reply stopped: saying so beats pointing at a half-written line.
        parts.insert(0, config.cut_off_template.format(max_tokens=obs.get("max_tokens") or "?"))
    stdout = _clean_stdout(obs.get("stdout"))
    if status != "no_code" and stdout.strip() and config.stdout_tail_chars:
        parts.append("Output (last part):\n" + _tail(stdout, config.stdout_tail_chars))
    if status == "died":
        stderr = _clean_stderr(obs.get("stderr"))
        if stderr.strip() and config.stderr_tail_chars:
            parts.append("Error output (last part):\n" + _tail(stderr, config.stderr_tail_chars))
    parts.append(config.no_code_instruction if status == "no_code" else config.instruction)
    return "\n\n".join(p.rstrip() for p in parts if p and p.strip())


def failure_summary(obs: dict, code: str | None, config: FeedbackConfig = FeedbackConfig(),
                    keep: str | None = None) -> str:
    """What went wrong, with the failed code left out: the error or the failing check and what it computed, the
    output; no traceback, no local values, and no line of `code` (unless it is also in `keep`, the visible
    checks). For a retry that regenerates instead of editing (small models copy code kept in front of them)."""
    cfg = replace(config, include_traceback=False, include_locals=False, instruction="", no_code_instruction="",
                  error_template="It raised {ename}: {evalue}",
                  check_failed_template="It ran, but a check failed ({passed} of {total} passed):",
                  timeout_template="It ran longer than {timeout} s and was stopped: a loop that never ends or an "
                                   "algorithm that is too slow.",
                  syntax_error_template="It had a syntax error at line {lineno}:",
                  no_code_template="The answer had no code block.")
    text = feedback_message(obs, cfg)
    kept = {line.strip() for line in (keep or "").splitlines()}
    own = {line.strip() for line in (code or "").splitlines() if len(line.strip()) >= 6} - kept
    return "\n".join(line for line in text.splitlines() if line.strip() not in own).strip()


def _error_parts(obs, cfg):
    ename, evalue = obs.get("ename") or "Exception", _one_line(obs.get("evalue"))
    parts = [cfg.error_template.format(ename=ename, evalue=evalue).rstrip(": ")]
    own = (obs.get("locals") or {}).get("check") if isinstance(obs.get("locals"), dict) else None
    if own and cfg.include_check_values:
        # An assert in the answer's own code failed: say what it computed, as for a visible check.
        f = CheckFailure.from_dict(own)
        line = describe_failure(f) or (f"Assertion message: {f.message}" if f.message else None)
        if line:
            parts[0] += " in an assert of your own code:\n    " + f.source.replace("\n", "\n    ") + "\n" + line
    if cfg.include_traceback:
        tb = clean_traceback(obs.get("traceback"), cfg.traceback_chars)
        if tb:
            parts.append(tb if tb.startswith("Traceback") else "Traceback:\n" + tb)
    parts.append(_locals_part(obs.get("locals"), cfg))
    return parts


def _timeout_parts(obs, cfg):
    t = obs.get("timeout_s")
    if isinstance(t, (int, float)) and not isinstance(t, bool):
        parts = [cfg.timeout_template.format(timeout=f"{t:g}")]
    else:
        parts = [cfg.timeout_unknown_template]
    if cfg.include_traceback:
        tb = clean_traceback(obs.get("traceback"), cfg.traceback_chars)
        if tb:
            parts.append("Where it was stopped:\n" + tb)
    parts.append(_locals_part(obs.get("locals"), cfg))
    return parts


def _died_parts(obs, cfg):
    return [cfg.died_template]


def _syntax_parts(obs, cfg):
    lineno, text, offset = obs.get("lineno"), obs.get("text"), obs.get("offset")
    msg = _one_line(obs.get("evalue")) or "invalid syntax"
    if lineno is not None and text is not None:
        line = text.rstrip("\n")
        stripped = line.lstrip()
        caret = ""
        if isinstance(offset, int) and offset >= 1:
            caret = "\n    " + " " * max(0, offset - 1 - (len(line) - len(stripped))) + "^"
        return [cfg.syntax_error_template.format(lineno=lineno) + "\n    " + stripped + caret
                + f"\n{obs.get('ename') or 'SyntaxError'}: {msg}"]
    m = re.search(r"line (\d+)", strip_ansi(" ".join(_lines(obs.get("traceback")))) + " " + msg)
    head = cfg.syntax_error_template.format(lineno=m.group(1) if m else "?")
    tb = clean_traceback(obs.get("traceback"), cfg.traceback_chars)
    return [head + "\n" + (tb or f"{obs.get('ename') or 'SyntaxError'}: {msg}")]


def _no_code_parts(obs, cfg):
    return [cfg.no_code_template]


def _check_parts(obs, cfg):
    report = obs.get("checks")
    if isinstance(report, dict):
        report = CheckReport.from_dict(report)
    if report is None:
        return ["A check failed."]
    head = cfg.check_failed_template.format(passed=report.passed, total=report.total)
    if report.interrupted:
        head += "\nThe checks were interrupted before they finished."
    if not report.failures:
        return [head]
    what, *rest = _failure_parts(report.failures[0], cfg)
    return [head + "\n" + what, *rest]


def _failure_parts(f: CheckFailure, cfg):
    """[the check and what it computed, traceback, locals]."""
    lines = ["    " + f.source.replace("\n", "\n    ")]
    if not cfg.include_check_values:
        lines.append(f"{f.error['ename']}: {_one_line(f.error.get('evalue'))}" if f.error else "AssertionError")
        return ["\n".join(lines)]
    if f.error:
        what = f"`{f.call}` raised" if f.call else "It raised"
        lines.append(f"{what} {f.error.get('ename')}: {_one_line(f.error.get('evalue'))}")
        parts = ["\n".join(lines)]
        if cfg.include_traceback and f.error.get("traceback"):
            parts.append("Traceback:\n" + _trim_middle(_tidy("\n".join(f.error["traceback"])), cfg.traceback_chars))
        parts.append(_locals_part(f.error, cfg))
        return parts
    line = describe_failure(f)
    if line:
        lines.append(line)
    if f.message:
        lines.append(f"Check message: {f.message}")
    return ["\n".join(lines)]


def describe_failure(f: CheckFailure) -> str | None:
    """One line saying what the failing check computed, e.g. "`f('cata')` returned 'catatac', expected 'catac'"."""
    if f.call is None or f.got is None:
        return None
    verb = "returned" if "(" in f.call else "was"
    did = f"`{f.call}` {verb} {f.got}"
    op, exp = f.op, f.expected
    if f.predicate:
        return f"`{f.predicate}` was {f.predicate_value}: {did}"
    text = {
        "==": f"{did}, expected {exp}",
        "is": f"{did}, expected {exp}",
        "!=": f"{did}, expected anything but {exp}",
        "is not": f"{did}, expected anything but {exp}",
        "in": f"{did}, expected one of {exp}",
        "not in": f"{did}, expected none of {exp}",
        "contains": f"{did}, which does not contain {exp}",
        "not contains": f"{did}, which contains {exp}",
        "approx": f"{did}, expected {exp} (within {f.tolerance})",
        "falsy": f"{did}, expected a false value",
        "truthy": f"{did}, expected a true value",
    }.get(op, f"{did}, expected a value {op} {exp}" if op in ("<", "<=", ">", ">=") else f"{did}")
    if exp is not None and f.got == exp and op in ("==", "approx", "is"):
        if f.got_type and f.expected_type and f.got_type != f.expected_type:
            text += f" (got type {f.got_type}, expected type {f.expected_type})"
        else:
            text += " (they print the same but are not equal)"
    return text


def _locals_part(info, cfg) -> str | None:
    if not cfg.include_locals or not info:
        return None
    structured = isinstance(info.get("locals"), dict)  # {"function", "line", "locals"} or a bare mapping
    values = {k: v for k, v in (info["locals"] if structured else info).items() if isinstance(v, str)}
    if not values:
        return None
    where = ""
    if structured and info.get("function") and info.get("function") != "<module>":
        where = f" in `{info['function']}`"
    if structured and info.get("line"):
        where += f" at line {info['line']}"
    lines, used = [], 0
    for name, value in values.items():
        line = f"  {name} = {value}"
        if used + len(line) > cfg.locals_chars:
            room = cfg.locals_chars - used - len(f"  {name} = ") - 4
            if room >= 20:
                lines.append(f"  {name} = {value[:room]} ...")
            lines.append("  ...")
            break
        lines.append(line)
        used += len(line) + 1
    return f"Local values{where} when it failed:\n" + "\n".join(lines)


def clean_traceback(traceback, budget: int) -> str:
    """ANSI-free traceback without Loopbook's wrapper frames, library frames cut to one line, trimmed to budget."""
    entries = []
    for entry in _lines(traceback):
        entry = strip_ansi(entry).rstrip("\n")
        if not entry.strip() or set(entry.strip()) == {"-"}:
            continue
        if "__loopbook_" in entry or "<loopbook>" in entry or "skipping hidden" in entry:
            continue
        first = entry.lstrip().split("\n", 1)[0]
        if first.startswith("File") and _LIBRARY_FRAME.search(first):
            entry = entry.split("\n", 1)[0]
        entries.append(_tidy(entry))
    return _trim_middle("\n".join(entries), budget)


_IPYTHON_HEADER = re.compile(r"^\w+ {2,}Traceback \(most recent call last\)$", re.M)
_SOLUTION_FILE = re.compile(r"<solution-[0-9a-f]+>")


def _tidy(text: str) -> str:
    """IPython's banner as plain Python writes it, and candidate file names without their hash."""
    return _SOLUTION_FILE.sub("<solution>", _IPYTHON_HEADER.sub("Traceback (most recent call last):", text))


def _lines(value) -> list[str]:
    if not value:
        return []
    return [value] if isinstance(value, str) else [str(v) for v in value]


def _one_line(text) -> str:
    text = strip_ansi(str(text or "")).strip()
    return text if len(text) <= 300 else text[:296] + " ..."


def _clean_stdout(text) -> str:
    _, rest = parse_check_output(strip_ansi(text or ""))
    return rest


def _clean_stderr(text) -> str:
    _, rest = parse_locals_output(strip_ansi(text or ""))
    return rest


def _tail(text: str, budget: int) -> str:
    text = text.rstrip("\n")
    if len(text) <= budget:
        return text
    cut = text[-budget:]
    nl = cut.find("\n")
    if 0 <= nl < budget // 2:
        cut = cut[nl + 1:]  # start at a whole line when that costs little
    return cut


# A third from the head: a traceback's end says most. The marker counts against the budget.
_trim_middle = partial(trim_middle, head_thirds=1, fit=True, marker="\n[... {} characters cut ...]\n")


_STATUS_PARTS = {
    "error": _error_parts,
    "timeout": _timeout_parts,
    "died": _died_parts,
    "syntax_error": _syntax_parts,
    "no_code": _no_code_parts,
    "check_failed": _check_parts,
}


def syntax_error_obs(code: str, *, filename: str = "<solution>") -> dict | None:
    """None when `code` compiles, else a syntax_error observation with line, offset and text for the caret."""
    try:
        compile(code, filename, "exec", dont_inherit=True)
    except SyntaxError as e:
        return {"status": "syntax_error", "ename": type(e).__name__, "evalue": e.msg, "lineno": e.lineno,
                "offset": e.offset, "text": e.text, "traceback": [], "stdout": "", "stderr": ""}
    except ValueError as e:  # source code string cannot contain null bytes
        return {"status": "syntax_error", "ename": "SyntaxError", "evalue": str(e), "lineno": None,
                "offset": None, "text": None, "traceback": [], "stdout": "", "stderr": ""}
    return None


_NORMALISE = [
    (re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]"), ""),
    (re.compile(r"0x[0-9a-fA-F]+"), "0x?"),
    (re.compile(r"<solution-[0-9a-f]+>"), "<solution>"),
    (re.compile(r"\d+"), "N"),
    (re.compile(r"\s+"), " "),
]


def _normalise(text, *, numbers: bool = True) -> str:
    text = str(text or "")
    for pattern, repl in _NORMALISE:
        if numbers or repl != "N":
            text = pattern.sub(repl, text)
    return text.strip()[:300]


def error_signature(obs: dict) -> str:
    """A string equal for two observations that are the same failure (addresses, numbers and file hashes ignored)."""
    status = obs.get("status") or "error"
    if status in ("timeout", "died", "no_code"):
        return status
    parts = [status, obs.get("ename") or "", _normalise(obs.get("evalue"))]
    report = obs.get("checks")
    if isinstance(report, dict):
        report = CheckReport.from_dict(report)
    if status == "check_failed" and report is not None and report.failures:
        f = report.failures[0]
        parts += [_normalise(f.source, numbers=False)]  # the check's own numbers tell checks apart
        if f.error:
            parts += [f.error.get("ename") or "", _normalise(f.error.get("evalue"))]
        elif f.message and f.got is None:
            parts += [_normalise(f.message)]
    return " | ".join(parts)
