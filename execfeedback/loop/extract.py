"""Pull the Python code out of a model reply.

Rules, in order:
- Fenced blocks are found with markdown-it-py (so fences inside lists, tildes, longer backtick runs
  and indented fences behave as CommonMark says). A block counts as Python when its language is a
  Python name (python, py, python3, ipython, pycon, ...), or when it has no language and its text
  parses as Python and looks like code. Other languages (bash, text, json, ...) are ignored.
- Several Python blocks are joined in order, so a helper in one block and the solution in the next
  both run. A block whose every def/class is defined again by a later block is a superseded draft
  ("here is the corrected version"): it is dropped, except for its import statements.
- An unclosed final fence (the model hit max_tokens) is taken. When it does not parse, its cut-off
  last top-level statement is dropped, unless that statement is a def or class (then the code is
  kept whole so the SyntaxError is fed back instead of a silently shortened function).
- No fence: the whole reply is taken when it parses as Python and looks like code; otherwise the
  longest stretch starting at a line like `def`/`class`/`import` that parses is taken.
- `>>> ` and `... ` doctest prompts are stripped; the output lines under them are dropped.
"""

from __future__ import annotations

import ast
import re
import textwrap
from dataclasses import dataclass

from markdown_it import MarkdownIt

from dialog.notebook import parses

PYTHON_LANGS = {"python", "py", "python3", "py3", "ipython", "ipython3", "pycon", "python-repl", "pyi"}

_md = MarkdownIt("commonmark")
_CODE_START = re.compile(r"^(def |class |import |from \S+ import |@|async def )")


@dataclass(frozen=True)
class Extraction:
    """What came out of a reply: `code` is None when there was none (`ok` False, `reason` says why)."""

    code: str | None
    ok: bool
    reason: str
    blocks: int  # Python code blocks found in the reply (0 for unfenced code)
    truncated: bool = False  # the last fence was never closed


def extract_code(reply: str) -> Extraction:
    """Return the Python code in a model reply, following the rules in this module's docstring."""
    if not reply or not reply.strip():
        return Extraction(None, False, "the reply was empty", 0)
    tokens = _md.parse(reply)
    fences = _python_fences(reply, tokens)
    if fences:
        return _from_fences(fences)
    langs = sorted({_lang(t) or "(none)" for t in tokens if t.type == "fence"})
    if PYTHON_LANGS.intersection(langs):
        return Extraction(None, False, "the reply's Python code block is empty", 0)
    if langs:
        return Extraction(None, False, f"the reply's code blocks are not Python ({', '.join(langs)})", 0)
    return _unfenced(reply)


def code_blocks(reply: str) -> list[str]:
    """Every Python code block of a reply, in order, each whole (for "code to cells")."""
    if not reply or not reply.strip():
        return []
    return [b.code for b in _python_fences(reply, _md.parse(reply))]


@dataclass
class _Block:
    code: str
    closed: bool


def _lang(token) -> str:
    info = (token.info or "").strip()
    return info.split()[0].lower().lstrip("{.").rstrip("}") if info else ""


def _python_fences(reply: str, tokens) -> list[_Block]:
    lines = re.split(r"\r\n?|\n", reply)  # the line breaks markdown-it counts in token.map
    blocks = []
    for tok in tokens:
        if tok.type not in ("fence", "code_block"):
            continue
        lang = _lang(tok) if tok.type == "fence" else ""
        if lang and lang not in PYTHON_LANGS:
            continue
        code = _strip_doctest(tok.content)
        if not lang and not (parses(code) and _looks_like_code(code)):
            continue
        closed = True
        if tok.type == "fence":
            last = lines[tok.map[1] - 1].strip() if tok.map and tok.map[1] - 1 < len(lines) else ""
            fence_char = tok.markup[0]
            closed = tok.map[1] - tok.map[0] > 1 and last.startswith(tok.markup) and set(last) == {fence_char}
        if code.strip():
            blocks.append(_Block(code.rstrip() + "\n", closed))
    return blocks


def _from_fences(blocks: list[_Block]) -> Extraction:
    n = len(blocks)
    truncated = not blocks[-1].closed
    if truncated:
        blocks[-1] = _Block(_trim_cut_off(blocks[-1].code), False)
    kept, dropped = _drop_superseded(blocks)
    code = "\n\n".join(c.strip("\n") for c in kept) + "\n"
    if n == 1:
        reason = "one Python block"
    else:
        reason = f"{n} Python blocks joined in order"
        if dropped:
            reason += f"; {dropped} earlier draft(s) redefined later were dropped (their imports kept)"
    if truncated:
        reason += "; the last fence was not closed (reply cut off?)"
    return Extraction(code, True, reason, n, truncated)


def _drop_superseded(blocks: list[_Block]) -> tuple[list[str], int]:
    """Replace each block whose every def/class is redefined later by its imports alone."""
    defined = [_top_level_defs(b.code) for b in blocks]
    out, dropped = [], 0
    for i, block in enumerate(blocks):
        later = set().union(*defined[i + 1:])
        if defined[i] and defined[i] <= later:
            out.append(_imports_only(block.code))
            dropped += 1
        else:
            out.append(block.code)
    return [c for c in out if c.strip()], dropped


def _top_level_defs(code: str) -> set[str]:
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return set()
    return {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}


def _imports_only(code: str) -> str:
    tree = ast.parse(code)
    return "\n".join(ast.get_source_segment(code, n) or "" for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom)))


def _trim_cut_off(code: str) -> str:
    """Drop the cut-off last top-level statement of a truncated block unless it is a def/class."""
    if parses(code):
        return code
    lines = code.splitlines(keepends=True)
    for i in range(len(lines) - 1, 0, -1):
        line = lines[i]
        if not line[:1].strip() or line[:1] in ")]}#":
            continue  # not the start of a top-level statement
        head = "".join(lines[:i])
        if parses(head) and head.strip():
            tail = "".join(lines[i:]).lstrip()
            return code if _CODE_START.match(tail) and not tail.startswith(("import ", "from ")) else head
    return code


def _strip_doctest(code: str) -> str:
    code = textwrap.dedent(code)
    lines = code.splitlines()
    if not any(ln.startswith(">>>") for ln in lines):
        return code
    out = []
    for ln in lines:
        if ln.startswith(">>> ") or ln == ">>>":
            out.append(ln[4:])
        elif ln.startswith("... ") or ln == "...":
            out.append(ln[4:])
        elif not ln.strip():
            out.append("")
        elif not out or out[-1] is None:
            continue
        else:
            out.append(None)  # an output line of the session: dropped
    return "\n".join(x for x in out if x is not None) + "\n"


def _looks_like_code(code: str) -> bool:
    """True unless the text is only bare names, literals or annotations (prose that happens to parse)."""
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return False
    for node in tree.body:
        if isinstance(node, ast.Expr):
            if any(isinstance(n, ast.Call) for n in ast.walk(node)):
                return True
        elif isinstance(node, ast.AnnAssign) and node.value is None:
            continue  # "Output: 5" parses as an annotation
        else:
            return True
    return False


def _unfenced(reply: str) -> Extraction:
    text = _strip_doctest(reply)
    if parses(text) and _looks_like_code(text):
        return Extraction(text.strip("\n") + "\n", True, "no fence; the whole reply is code", 0)
    lines = text.splitlines(keepends=True)
    for start, line in enumerate(lines):
        if not _CODE_START.match(line):
            continue
        for end in range(len(lines), start, -1):
            chunk = "".join(lines[start:end])
            if parses(chunk) and _looks_like_code(chunk):
                return Extraction(chunk.strip("\n") + "\n", True, "no fence; code taken from the prose", 0)
        break
    return Extraction(None, False, "the reply had no code block", 0)
