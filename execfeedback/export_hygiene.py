"""Dataset hygiene for the export: secret scrubbing, duplicate keys, observation budgets, token counts."""

from __future__ import annotations

import builtins
import hashlib
import keyword
import os
import re
from collections import Counter
from pathlib import Path
from typing import Iterable, Mapping

from dialog.context import trim_middle

# -- secret scrubbing ------------------------------------------------------------------------------

# (kind, placeholder, needles, pattern, replacement): the regex runs only when a needle occurs, and
# every pattern starts with a literal, which Python's re finds fast; a leading \b would make it crawl.
_RULES: list[tuple[str, str, tuple[str, ...], re.Pattern, object]] = []


def _rule(kind: str, placeholder: str, needles: tuple[str, ...], pattern: str, repl=None) -> None:
    _RULES.append((kind, placeholder, needles, re.compile(pattern), placeholder if repl is None else repl))


_NOT_AFTER_WORD = r"(?<![\w-]{prefix})"


def _literal_first(prefix: str, rest: str) -> str:
    """`prefix` + `rest`, not preceded by a word character (the lookbehind sits after the literal)."""
    return re.escape(prefix) + _NOT_AFTER_WORD.format(prefix=re.escape(prefix)) + rest


_rule("private_key", "<SECRET_PRIVATE_KEY>", ("PRIVATE KEY",),
      r"-----BEGIN ([A-Z0-9 ]*)PRIVATE KEY-----(?:(?!-----)[\s\S]){0,20000}-----END \1PRIVATE KEY-----")
# A block cut off by an output cap has no END line: take the base64 body (raw or \n-escaped lines).
_rule("private_key", "<SECRET_PRIVATE_KEY>", ("PRIVATE KEY",),
      r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----(?:[A-Za-z0-9+/=\s]|\\n|\\r)*")
_rule("api_key", "<SECRET_API_KEY>", ("sk-",), _literal_first("sk-", r"(?=[A-Za-z_-]*\d)[A-Za-z0-9_-]{20,}"))
_rule("api_key", "<SECRET_API_KEY>", ("hf_",), _literal_first("hf_", r"[A-Za-z0-9]{30,}"))
_rule("api_key", "<SECRET_API_KEY>", ("AIza",), _literal_first("AIza", r"[0-9A-Za-z_-]{35}"))
for _p in ("ghp_", "gho_", "ghu_", "ghs_", "ghr_"):
    _rule("github_token", "<SECRET_GITHUB_TOKEN>", (_p,), _literal_first(_p, r"[A-Za-z0-9]{30,}"))
_rule("github_token", "<SECRET_GITHUB_TOKEN>", ("github_pat_",), _literal_first("github_pat_", r"[A-Za-z0-9_]{30,}"))
for _p in ("AKIA", "ASIA"):
    _rule("aws_key", "<SECRET_AWS_KEY>", (_p,), _literal_first(_p, r"[0-9A-Z]{16}(?![0-9A-Za-z])"))
for _p in ("aws_secret_access_key", "AWS_SECRET_ACCESS_KEY"):
    _rule("aws_key", "<SECRET_AWS_KEY>", (_p,), "(" + re.escape(_p) + r"[\"']?\s*[=:]\s*[\"']?)[A-Za-z0-9/+=]{40}",
          r"\1<SECRET_AWS_KEY>")
for _p in ("xoxb-", "xoxa-", "xoxp-", "xoxo-", "xoxs-", "xoxr-"):
    _rule("token", "<SECRET_TOKEN>", (_p,), _literal_first(_p, r"[A-Za-z0-9-]{10,}"))
_rule("token", "<SECRET_TOKEN>", ("eyJ",), _literal_first("eyJ", r"[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"))
for _p in ("Bearer", "bearer", "BEARER", "Basic", "token", "Token"):
    _rule("token", "<SECRET_TOKEN>", (_p + " ",),
          "(" + _literal_first(_p, r"[ \t]+") + r")(?=[A-Za-z0-9._~+/-]*\d)[A-Za-z0-9._~+/-]{16,}=*",
          r"\1<SECRET_TOKEN>")
_rule("password", "<SECRET_PASSWORD>", ("://",), r"(://[^/\s:@\"'<>]+:)[^/\s@\"'<>]+@", r"\1<SECRET_PASSWORD>@")

_SECRET_NAME_BEFORE = re.compile(
    r"(?i:api[_-]?key|apikey|secret[_-]?key|client[_-]?secret|secret|access[_-]?token|auth[_-]?token|token"
    r"|password|passwd|pwd)[\"']?\s*$")


def _assignment(m: re.Match) -> str:
    # `password = "hunter2hunter2"`, `{"api_key": "..."}`: the name sits just before the = or :.
    before = m.string[max(0, m.start() - 40):m.start()]
    if not _SECRET_NAME_BEFORE.search(before):
        return m.group(0)
    return f"{m.group(1)}{m.group(2)}<SECRET>{m.group(2)}"


_rule("password", "<SECRET>", ("key", "KEY", "Key", "ecret", "ECRET", "oken", "OKEN", "assw", "ASSW", "pwd", "PWD"),
      r"([:=][ \t]*)([\"'])([^\"'\s<>]{8,})\2", _assignment)
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
        for kind, _placeholder, needles, pattern, repl in _RULES:
            for needle in needles:
                if needle in text:
                    text, n = pattern.subn(repl, text)
                    if n:
                        counts[kind] += n
                    break
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
_STRING_OR_COMMENT = re.compile(
    r"""("{3}[\s\S]*?"{3}|'{3}[\s\S]*?'{3}|"(?:\\.|[^"\\\n])*"|'(?:\\.|[^'\\\n])*')|#[^\n]*""")
_DOCSTRING_LINE = re.compile(r"^[ \t]*\x00(\d+)\x00[ \t]*$", re.MULTILINE)
# Tokens: a line start with its indentation, a name or number (with a leading dot: an attribute), a symbol.
_TOKEN = re.compile(r"\n[ \t]*(?=\S)|\.?\w+|[^\w\s]")


def normalise_code(code: str) -> str:
    """Code with comments, docstrings and layout dropped and its own names renamed by first appearance.

    Two snippets that differ only in comments, blank lines, spacing, indentation width or the names
    they chose for their variables and functions normalise to the same text; attribute names,
    builtins, keywords, numbers and string literals keep their meaning.
    """
    strings: list[str] = []

    def keep_string(m: re.Match) -> str:
        if m.group(1) is None:
            return ""
        strings.append(m.group(1))
        return f"\x00{len(strings) - 1}\x00"

    body = _STRING_OR_COMMENT.sub(keep_string, "\n" + code)
    dropped: set[int] = set()
    if strings:
        # A line that is only a string is a docstring (or a no-op): drop it and its text.
        dropped = {int(i) for i in _DOCSTRING_LINE.findall(body)}
        if dropped:
            body = _DOCSTRING_LINE.sub("", body)
    tokens = _TOKEN.findall(body)
    names: dict[str, str] = {}
    n_names = n_indents = 0
    for t in dict.fromkeys(tokens):
        c = t[0]
        if c == "\n":  # indentation widths, like names, by order of first appearance
            names[t] = f"\n{n_indents}"
            n_indents += 1
        elif (c.isalpha() or c == "_") and t not in _KEEP:
            names[t] = f"v{n_names}"
            n_names += 1
        else:
            names[t] = t
    kept = [s for i, s in enumerate(strings) if i not in dropped]
    return " ".join(map(names.__getitem__, tokens)) + "\x01" + "\x00".join(kept)


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

    def seen(self, line: str, near_key: bytes | None) -> bool:
        if self.mode == "none":
            return False
        h = digest(line)
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


class TokenCounter:
    """Counts the tokens of a chat row with a GGUF's own tokenizer (vocabulary only, no weights)."""

    def __init__(self, gguf_path: str | os.PathLike):
        from llama_cpp import Llama

        self.path = str(gguf_path)
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
