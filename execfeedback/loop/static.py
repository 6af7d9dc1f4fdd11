"""Static analysis before running: pyflakes findings that mean certain failure, checked against the
names the dialog's kernel already defines, turned into the observation a failed run would give."""

from __future__ import annotations

import ast
import builtins
from dataclasses import dataclass

from pyflakes import checker, messages

# What IPython puts in every kernel's namespace besides Python's builtins.
IPYTHON_NAMES = frozenset({"get_ipython", "display", "In", "Out", "exit", "quit", "_", "__", "___", "_i", "_ii",
                           "_iii", "_ih", "_oh", "_dh"})
# Findings that fail whenever the code runs; unused imports, redefinitions and the like do not.
CERTAIN = {
    messages.UndefinedName: "NameError",
    messages.UndefinedLocal: "UnboundLocalError",
    messages.ReturnOutsideFunction: "SyntaxError",
    messages.YieldOutsideFunction: "SyntaxError",
    messages.ContinueOutsideLoop: "SyntaxError",
    messages.BreakOutsideLoop: "SyntaxError",
    messages.DuplicateArgument: "SyntaxError",
    messages.TwoStarredExpressions: "SyntaxError",
    messages.TooManyExpressionsInStarredAssignment: "SyntaxError",
}


@dataclass(frozen=True)
class Finding:
    ename: str
    message: str
    line: int


def certain_failures(code: str, defined=()) -> list[Finding]:
    """Findings in `code` that fail for sure, given the names `defined` already (the kernel's namespace)."""
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return []  # the syntax check reports these with the interpreter's own message
    known = set(dir(builtins)) | IPYTHON_NAMES | set(defined)
    found = checker.Checker(tree, filename="<cell>", builtins=known).messages
    out = []
    for m in sorted(found, key=lambda m: (m.lineno, m.col)):
        ename = CERTAIN.get(type(m))
        if ename is not None:
            out.append(Finding(ename, m.message % m.message_args, m.lineno))
    return out


def observation(findings: list[Finding]) -> dict:
    """The observation fed back for findings, shaped like an execution error (nothing was run)."""
    first = findings[0]
    lines = [f"line {f.line}: {f.message}" for f in findings]
    evalue = (first.message.replace("undefined name ", "name ") + " is not defined" if first.ename == "NameError"
              else first.message)
    return {"status": "error", "ename": first.ename, "evalue": evalue, "static": True,
            "traceback": ["Found before running (static analysis, pyflakes):", *lines]}
