"""Dataset hygiene for the export: secret scrubbing, duplicate keys, observation budgets, token counts."""

from __future__ import annotations

import builtins
import hashlib
import keyword
import os
import re
import sys
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Mapping

from dialog.render import trim_middle

# -- secret scrubbing ------------------------------------------------------------------------------

# Each group: (needles, [(kind, pattern, replacement)]). Needles are looked for in the lower-cased text,
# each once per text; a group's regexes run only when one of its needles occurs. Every pattern starts
# with a literal, which Python's re finds fast (a leading \b or character class makes it try every position).
_GROUPS: list[tuple[tuple[str, ...], list[tuple[str, re.Pattern, object]]]] = []


def _group(needles: tuple[str, ...], rules: list[tuple[str, str, object]]) -> None:
    _GROUPS.append((tuple(n.lower() for n in needles), [(kind, re.compile(p), repl) for kind, p, repl in rules]))


def _lit(prefix: str, rest: str) -> str:
    """`prefix` + `rest`, not preceded by a word character (the lookbehind sits after the literal)."""
    p = re.escape(prefix)
    return f"{p}(?<![\\w-]{p}){rest}"


# Credentials Loopbook itself issues, whatever app token they came from: a kernel's dialog token (lbk<id>.<hex>,
# see kernels/helper_setup.py) and a browser login's session id (lbs_..., see app.py). First, so that the generic token
# rules below do not take them under another name.
_group(("lbk",), [("kernel_token", _lit("lbk", r"[0-9]{1,19}\.[0-9a-f]{32}(?![0-9a-f])"), "<SECRET_KERNEL_TOKEN>")])
_group(("lbs_",), [("session", _lit("lbs_", r"[A-Za-z0-9_-]{43}(?![A-Za-z0-9_-])"), "<SECRET_SESSION>")])
_group(("PRIVATE KEY",), [
    ("private_key", r"-----BEGIN ([A-Z0-9 ]*)PRIVATE KEY-----(?:(?!-----)[\s\S]){0,20000}-----END \1PRIVATE KEY-----",
     "<SECRET_PRIVATE_KEY>"),
    # A block cut off by an output cap has no END line: take the base64 body (raw or \n-escaped lines).
    ("private_key", r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----(?:[A-Za-z0-9+/=\s]|\\n|\\r)*", "<SECRET_PRIVATE_KEY>")])
_group(("sk-",), [("api_key", _lit("sk-", r"(?=[A-Za-z_-]*\d)[A-Za-z0-9_-]{20,}"), "<SECRET_API_KEY>")])
_group(("hf_",), [("api_key", _lit("hf_", r"[A-Za-z0-9]{30,}"), "<SECRET_API_KEY>")])
_group(("AIza",), [("api_key", _lit("AIza", r"[0-9A-Za-z_-]{35}"), "<SECRET_API_KEY>")])
_group(("gh",), [("github_token", _lit("gh", r"[pousr]_[A-Za-z0-9]{30,}"), "<SECRET_GITHUB_TOKEN>")])
_group(("_pat_",), [("github_token", _lit("github_pat_", r"[A-Za-z0-9_]{30,}"), "<SECRET_GITHUB_TOKEN>")])
_group(("AKIA", "ASIA"), [("aws_key", _lit("A", r"[KS]IA[0-9A-Z]{16}(?![0-9A-Za-z])"), "<SECRET_AWS_KEY>")])
_group(("secret_access",), [
    ("aws_key", "(" + re.escape(name) + r"[\"']?\s*[=:]\s*[\"']?)[A-Za-z0-9/+=]{40}", r"\1<SECRET_AWS_KEY>")
    for name in ("aws_secret_access_key", "AWS_SECRET_ACCESS_KEY")])
_group(("xox",), [("token", _lit("xox", r"[abposr]-[A-Za-z0-9-]{10,}"), "<SECRET_TOKEN>")])
_group(("eyJ",), [("token", _lit("eyJ", r"[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"),
                   "<SECRET_TOKEN>")])
for _needle, _words in (("bearer", ("Bearer", "bearer", "BEARER")), ("basic", ("Basic",)), ("token", ("token", "Token"))):
    _group((_needle,), [
        ("token", "(" + _lit(word, r"[ \t]+") + r")(?=[A-Za-z0-9._~+/-]*\d)[A-Za-z0-9._~+/-]{16,}=*", r"\1<SECRET_TOKEN>")
        for word in _words])
_group(("://",), [("password", r"(://[^/\s:@\"'<>]+:)[^/\s@\"'<>]+@", r"\1<SECRET_PASSWORD>@")])

_SECRET_NAME_BEFORE = re.compile(
    r"(?i:api[_-]?key|apikey|secret[_-]?key|client[_-]?secret|secret|access[_-]?token|auth[_-]?token|token"
    r"|password|passwd|pwd)[\"']?\s*$")


def _assignment(m: re.Match) -> str:
    # `password = "hunter2hunter2"`, `{"api_key": "..."}`: the name sits just before the = or :.
    if not _SECRET_NAME_BEFORE.search(m.string, max(0, m.start() - 40), m.start()):
        return m.group(0)
    return f"{m.group(1)}{m.group(2)}<SECRET>{m.group(2)}"


_group(("api", "secret", "token", "passw", "pwd"), [("password", r"([:=][ \t]*)([\"'])([^\"'\s<>]{8,})\2", _assignment)])
# Two- and three-letter TLDs and common long ones; `a@b.sum()` and `x@self.weights` are matrix products.
_EMAIL_DOMAIN = re.compile(r"@(?:[A-Za-z0-9-]+\.)+(?:[A-Za-z]{2,3}|info|mail|email|online|site|tech|cloud|local|dev"
                           r"|app|name|mobi)\b(?![(\w])")
_EMAIL_LOCAL = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._%+-")


def _scrub_emails(text: str) -> tuple[str, int]:
    """E-mail addresses to <EMAIL>; the local part is walked back from the @ (a regex would crawl)."""
    out, last, n = [], 0, 0
    for m in _EMAIL_DOMAIN.finditer(text):
        i = m.start()
        while i > last and text[i - 1] in _EMAIL_LOCAL:
            i -= 1
        if i == m.start() or text[i] in ".-":
            continue
        out.append(text[last:i])
        out.append("<EMAIL>")
        last = m.end()
        n += 1
    if not n:
        return text, 0
    out.append(text[last:])
    return "".join(out), n


_NEEDLES = tuple(sorted({n for needles, _ in _GROUPS for n in needles}))

SECRET_ENV_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL", re.IGNORECASE)
MIN_LITERAL = 8  # shorter environment values ("1", "false") would wreck ordinary text


def env_secrets(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Values of environment variables whose names look secret, longer than a word like 'false'."""
    environ = os.environ if environ is None else environ
    out = {}
    for name, value in environ.items():
        value = (value or "").strip()
        if not SECRET_ENV_NAME.search(name) or len(value) < MIN_LITERAL:
            continue
        if os.path.isabs(value) and os.path.exists(value):  # a socket or key-file path, not the secret
            continue
        out[value] = name
    return out


class Scrubber:
    """Replaces secrets with placeholders and counts them by kind; one instance per export."""

    def __init__(self, *, app_token: str | None = None, secrets: Iterable[str] = (),
                 environ: Mapping[str, str] | None = None, home: str | None = None):
        literals: dict[str, tuple[str, str]] = {}
        for value in env_secrets(environ):
            literals[value] = ("env_secret", "<SECRET_ENV_VALUE>")
        for value in secrets:
            if value and len(value.strip()) >= 4:
                literals[value.strip()] = ("app_token", "<SECRET_APP_TOKEN>")
        if app_token and len(app_token.strip()) >= 4:
            literals[app_token.strip()] = ("app_token", "<SECRET_APP_TOKEN>")
        self.literal_sources = Counter(kind for kind, _ in literals.values())
        # Longest first, so a secret that contains another is replaced whole.
        self._literals = sorted(literals.items(), key=lambda kv: -len(kv[0]))
        home = os.path.expanduser("~") if home is None else home
        self._home = home.rstrip("/") + "/" if home and len(home.rstrip("/")) > 1 else None
        self.counts: Counter[str] = Counter()

    @classmethod
    def for_data_dir(cls, data_dir: Path, *, secrets: Iterable[str] = (), environ: Mapping[str, str] | None = None):
        token_file = Path(data_dir) / "token"
        try:
            token = token_file.read_text(encoding="utf-8").strip()
        except OSError:
            token = None
        return cls(app_token=token, secrets=secrets, environ=environ)

    def __call__(self, text: str) -> str:
        if not text:
            return text
        counts = self.counts
        for value, (kind, placeholder) in self._literals:
            if value in text:
                counts[kind] += text.count(value)
                text = text.replace(value, placeholder)
        low = text.lower()
        present = {n for n in _NEEDLES if n in low}
        if present:
            for needles, rules in _GROUPS:
                if not present.isdisjoint(needles):
                    for kind, pattern, repl in rules:
                        text, n = pattern.subn(repl, text)
                        if n:
                            counts[kind] += n
        if "@" in text:
            text, n = _scrub_emails(text)
            if n:
                counts["email"] += n
        if self._home and self._home in text:
            counts["home_path"] += text.count(self._home)
            text = text.replace(self._home, "~/")
        return text


# -- duplicate keys --------------------------------------------------------------------------------

_KEEP = frozenset(keyword.kwlist) | frozenset(keyword.softkwlist) | frozenset(
    n for n in dir(builtins) if not n.startswith("_")) | {"self", "cls"}
# Each step is one C-level regex pass: a per-token Python loop would cost more than the rest of the export.
_TRIPLE = re.compile(r'"""[\s\S]*?"""|' r"'''[\s\S]*?'''")
_STRING = re.compile(r'"(?:\\.|[^"\\\n])*"|' r"'(?:\\.|[^'\\\n])*'")
_COMMENT = re.compile(r"#[^\n]*")
_NAME = re.compile(r"(\.?[A-Za-z_]\w*)")
_INDENT = re.compile(r"\n([ \t]*)(?=\S)")
_BLANKS = re.compile(r"\n{2,}")


def normalise_code(code: str) -> str:
    """Code with comments, docstrings and layout dropped and its own names renamed by first appearance.

    Two snippets that differ only in comments, docstrings, blank lines, spacing, indentation width or
    the names they chose for their variables and functions normalise to the same text; attribute
    names, builtins, keywords, numbers and string literals keep their meaning.
    """
    body = _TRIPLE.sub("", code) if ('"""' in code or "'''" in code) else code
    strings = _STRING.findall(body)
    if strings:
        body = _STRING.sub('""', body)
    if "#" in body:
        body = _COMMENT.sub("", body)
    parts = _NAME.split("\n" + body)
    names = parts[1::2]
    canon: dict[str, str] = {}
    n = 0
    for name in dict.fromkeys(names):
        if name[0] == "." or name in _KEEP:
            canon[name] = name
        else:
            canon[name] = f"v{n}"
            n += 1
    lines = _INDENT.findall("\n" + body)
    widths: dict[str, int] = {}
    for w in lines:
        widths.setdefault(w, len(widths))
    skeleton = "v".join(parts[0::2]).replace(" ", "").replace("\t", "")
    skeleton = _BLANKS.sub("\n", skeleton).strip("\n")
    # The indentation pattern: each line's width, numbered by first appearance (2 or 4 spaces alike).
    indents = ",".join([str(widths[w]) for w in lines])
    return "\x01".join((skeleton, " ".join(map(canon.__getitem__, names)), indents, "\x00".join(strings)))


def normalise_text(text: str) -> str:
    """Prose compared case- and whitespace-insensitively."""
    return " ".join(text.split()).casefold()


def digest(*parts: str) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    for p in parts:
        h.update(p.encode("utf-8", "surrogatepass"))
        h.update(b"\x1f")
    return h.digest()


class Deduper:
    """Drops rows seen before: exactly (same serialised row) or nearly (same normalised key)."""

    def __init__(self, mode: str = "near"):
        self.mode = mode
        self._exact: set[bytes] = set()
        self._near: set[bytes] = set()
        self.exact = 0
        self.near = 0

    def seen(self, h: bytes, near_key: bytes | None) -> bool:
        """`h`: the digest of the serialised row; `near_key`: the digest of its normalised content."""
        if self.mode == "none":
            return False
        if h in self._exact:
            self.exact += 1
            return True
        if self.mode == "near" and near_key is not None:
            if near_key in self._near:
                self.near += 1
                return True
            self._near.add(near_key)
        self._exact.add(h)
        return False


# -- budgets ---------------------------------------------------------------------------------------

def cut(text: str, budget: int) -> tuple[str, bool]:
    """Head and tail of `text` within about `budget` characters (0: no limit), and whether it was cut."""
    if not budget or len(text) <= budget:
        return text, False
    return trim_middle(text, budget), True


@contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 (C libraries write there directly) for the duration."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


class TokenCounter:
    """Counts the tokens of a chat row with a GGUF's own tokenizer (vocabulary only, no weights)."""

    def __init__(self, gguf_path: str | os.PathLike):
        from llama_cpp import Llama

        self.path = str(gguf_path)
        with _quiet_stderr():  # llama.cpp logs its context set-up even with verbose=False
            self.llm = Llama(model_path=self.path, vocab_only=True, verbose=False)
        self._formatter = None
        template = (self.llm.metadata or {}).get("tokenizer.chat_template")
        if template:
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            vocab = self.llm._model  # noqa: SLF001 - the only way to the BOS/EOS texts
            self._formatter = Jinja2ChatFormatter(
                template=template, eos_token=vocab.token_get_text(vocab.token_eos()),
                bos_token=vocab.token_get_text(vocab.token_bos()), add_generation_prompt=False)
        self.name = Path(self.path).name
        self.exact_template = self._formatter is not None

    def count_text(self, text: str) -> int:
        return len(self.llm.tokenize(text.encode("utf-8", "surrogatepass"), add_bos=False, special=True))

    def count(self, messages: list[dict]) -> int:
        """Tokens of the rendered chat (the GGUF's template), else content tokens + 5 per message."""
        if self._formatter is not None:
            try:
                return self.count_text(self._formatter(messages=messages).prompt)
            except Exception:  # noqa: BLE001 - a template may refuse a role (tool); fall back to the estimate
                pass
        return sum(self.count_text(m["content"]) + 5 for m in messages)
