"""Checks on the vendored browser assets: present, the right versions, licensed, and offline."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STATIC = ROOT / "static"
VENDOR = STATIC / "vendor"
BUILD = STATIC / "build"

# File -> the least size (bytes) a real build has; a stub, an error page or an empty copy is smaller.
VENDORED = {
    "htmx.min.js": 30_000,
    "htmx-ext-sse.js": 3_000,
    "codemirror.js": 200_000,
    "LICENSES.md": 2_000,
}

# XML namespace names: identifiers passed to createElementNS or written as xmlns, never fetched.
NAMESPACE_URIS = {
    "http://www.w3.org/2000/svg",
    "http://www.w3.org/1999/xhtml",
    "http://www.w3.org/1999/xlink",
    "http://www.w3.org/1998/Math/MathML",
    "http://www.w3.org/XML/1998/namespace",
    "http://www.w3.org/2000/xmlns/",
}
# A scheme followed by at least one host character; a bare "https://" prefix test is not a URL.
URL = re.compile(r"https?://[A-Za-z0-9\[][^\s\"'`()<>\\]*")

# After these characters (or these keywords), a "/" starts a regular expression, not a division.
REGEX_AFTER_CHARS = set("(,=:[!&|?{};~+-*%<>^")
REGEX_AFTER_WORDS = {"return", "typeof", "instanceof", "in", "of", "new", "delete", "void", "throw", "case", "do", "else"}


def js_comment_spans(text):
    """(start, end) of every comment in JavaScript source; fails if the scan ends inside a token.

    Tracks strings, template literals (with nested ${...}) and regular expression literals, so a
    "//" inside "https://..." or a regex is never taken for a comment.
    """
    spans = []
    i, n = 0, len(text)
    last = ""  # the last significant character or word outside strings and comments
    templates = []  # brace depth at each open ${ of the template literals we are inside
    depth = 0

    def skip_string(i, quote):
        i += 1
        while i < n and text[i] != quote:
            if text[i] == "\\":
                i += 1
            elif text[i] == "\n" and quote != "`":
                raise AssertionError(f"unterminated string literal near offset {i}")
            i += 1
        return i + 1

    def skip_template(i):
        """From inside a template literal: returns (offset, True if it stopped at a '${')."""
        while i < n:
            c = text[i]
            if c == "\\":
                i += 2
                continue
            if c == "`":
                return i + 1, False
            if c == "$" and text.startswith("${", i):
                return i + 2, True
            i += 1
        raise AssertionError("unterminated template literal")

    def skip_regex(i):
        i += 1
        in_class = False
        while i < n:
            c = text[i]
            if c == "\\":
                i += 2
                continue
            if c == "\n":
                raise AssertionError(f"unterminated regular expression near offset {i}")
            if c == "[":
                in_class = True
            elif c == "]":
                in_class = False
            elif c == "/" and not in_class:
                i += 1
                while i < n and (text[i].isalnum() or text[i] in "_$"):
                    i += 1
                return i
            i += 1
        raise AssertionError("unterminated regular expression")

    while i < n:
        c = text[i]
        if text.startswith("//", i):
            end = text.find("\n", i)
            end = n if end < 0 else end
            spans.append((i, end))
            i = end
        elif text.startswith("/*", i):
            end = text.find("*/", i + 2)
            if end < 0:
                raise AssertionError(f"unterminated block comment at offset {i}")
            spans.append((i, end + 2))
            i = end + 2
        elif c in "'\"":
            i = skip_string(i, c)
            last = "a"
        elif c == "`":
            i, opened = skip_template(i + 1)
            if opened:
                templates.append(depth)
            last = "a" if not opened else "{"
        elif c == "/":
            if last == "" or last in REGEX_AFTER_CHARS or last in REGEX_AFTER_WORDS:
                i = skip_regex(i)
                last = "a"
            else:
                i += 1
                last = "/"
        elif c == "{":
            depth += 1
            i += 1
            last = "{"
        elif c == "}":
            if templates and templates[-1] == depth:
                templates.pop()
                i, opened = skip_template(i + 1)
                if opened:
                    templates.append(depth)
                last = "a" if not opened else "{"
            else:
                depth -= 1
                i += 1
                last = "}"
        elif c.isalnum() or c in "_$":
            j = i
            while j < n and (text[j].isalnum() or text[j] in "_$"):
                j += 1
            word = text[i:j]
            last = word if word in REGEX_AFTER_WORDS else "a"
            i = j
        elif c.isspace():
            i += 1
        else:
            last = c if c not in ")]" else "a"
            i += 1
    assert not templates and depth == 0, "scan ended inside a template literal or a block"
    return spans


def css_comment_spans(text):
    return [m.span() for m in re.finditer(r"/\*.*?\*/", text, flags=re.S)]


def runtime_urls(path, root=ROOT):
    """URLs outside comments in a served .js or .css file, XML namespace names left out."""
    text = path.read_text(encoding="utf-8")
    spans = css_comment_spans(text) if path.suffix == ".css" else js_comment_spans(text)
    found = []
    for match in URL.finditer(text):
        if any(start <= match.start() < end for start, end in spans):
            continue
        if match.group(0).rstrip("/") in {u.rstrip("/") for u in NAMESPACE_URIS}:
            continue
        line = text.count("\n", 0, match.start()) + 1
        found.append(f"{path.relative_to(root)}:{line}: {match.group(0)}")
    return found


def served_files():
    """Every .js and .css the app can serve from static/ (the build tooling is never served)."""
    return sorted(
        p for p in STATIC.rglob("*")
        if p.suffix in {".js", ".css"} and BUILD not in p.parents and p.is_file()
    )


def lock_versions():
    lock = json.loads((BUILD / "package-lock.json").read_text())
    return {
        key.removeprefix("node_modules/"): entry["version"]
        for key, entry in lock["packages"].items()
        if key.startswith("node_modules/") and "/node_modules/" not in key.removeprefix("node_modules/")
    }


@pytest.mark.parametrize("name", sorted(VENDORED))
def test_vendored_file_exists_and_is_not_trivial(name):
    path = VENDOR / name
    assert path.is_file(), f"{path} is missing: run static/build/build.sh"
    assert path.stat().st_size >= VENDORED[name], f"{path} is only {path.stat().st_size} bytes"


def test_htmx_is_major_version_2_and_matches_the_lockfile():
    text = (VENDOR / "htmx.min.js").read_text(encoding="utf-8")
    versions = set(re.findall(r"""version\s*:\s*["'](\d+\.\d+\.\d+)["']""", text))
    assert len(versions) == 1, f"expected one htmx version string, found {versions}"
    (version,) = versions
    assert version.split(".")[0] == "2", f"htmx {version} vendored; Loopbook targets htmx 2.x"
    assert version == lock_versions()["htmx.org"]


def test_sse_extension_is_the_htmx_2_one():
    text = (VENDOR / "htmx-ext-sse.js").read_text(encoding="utf-8")
    assert re.search(r"""htmx\.defineExtension\(\s*['"]sse['"]""", text)
    for attribute in ("sse-connect", "sse-swap", "sse-close"):
        assert attribute in text, f"the SSE extension does not handle {attribute}"
    package = json.loads((BUILD / "package.json").read_text())
    assert package["devDependencies"]["htmx-ext-sse"].startswith("2.")


def test_codemirror_bundle_defines_window_cm_with_everything_editor_js_uses():
    bundle = (VENDOR / "codemirror.js").read_text(encoding="utf-8")
    # esbuild's IIFE with --global-name=CM: a top-level `var CM` in a classic script is window.CM.
    assert re.match(r"\s*var CM\s*=\s*\(\(\)\s*=>\s*\{", bundle), "codemirror.js does not start with `var CM=(()=>{`"
    exported = set(re.findall(r"[{,]([A-Za-z_$][\w$]*):\(\)=>", bundle))
    used = set(re.findall(r"\bCM\.([A-Za-z_$][\w$]*)", (STATIC / "editor.js").read_text(encoding="utf-8")))
    assert {"EditorView", "EditorState", "keymap", "indentWithTab", "python", "markdown", "Compartment", "placeholder"} <= used
    assert used <= exported, f"editor.js uses CM names the bundle does not export: {sorted(used - exported)}"


def test_no_served_asset_loads_anything_from_the_network():
    files = served_files()
    assert {VENDOR / "htmx.min.js", VENDOR / "codemirror.js", STATIC / "editor.js"} <= set(files)
    offenders = [hit for path in files for hit in runtime_urls(path)]
    assert not offenders, "these would load from the network at runtime:\n" + "\n".join(offenders)


def test_licenses_name_every_vendored_package_with_its_version_and_text():
    text = (VENDOR / "LICENSES.md").read_text(encoding="utf-8")
    versions = lock_versions()
    package = json.loads((BUILD / "package.json").read_text())
    vendored = [name for name in package["devDependencies"] if name != "esbuild"]
    for name in vendored + ["@lezer/common", "@lezer/lr", "@lezer/python", "@lezer/markdown"]:
        assert re.search(rf"^\| {re.escape(name)} \| {re.escape(versions[name])} \| (MIT|0BSD) \|", text, re.M), \
            f"LICENSES.md has no row for {name} {versions[name]}"
        assert f"## {name} {versions[name]} (" in text, f"LICENSES.md lacks the license text of {name}"
    sections = re.findall(r"^## (\S+) \S+ \((\w+)\)\n\n```text\n(.*?)\n```", text, re.M | re.S)
    assert len(sections) >= len(vendored)
    for name, license_id, body in sections:
        marker = "Permission is hereby granted" if license_id == "MIT" else "Permission to use, copy, modify"
        assert marker in body, f"the {license_id} text of {name} looks wrong"


def test_build_is_pinned_and_node_modules_is_ignored():
    package = json.loads((BUILD / "package.json").read_text())
    versions = lock_versions()
    for name, spec in package["devDependencies"].items():
        assert re.fullmatch(r"\d+\.\d+\.\d+", spec), f"{name} is pinned as {spec!r}; pin an exact version"
        assert versions[name] == spec, f"package-lock.json has {name} {versions[name]}, package.json {spec}"
    ignored = (ROOT / ".gitignore").read_text().split()
    assert "static/build/node_modules/" in ignored


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_editor_js_parses():
    result = subprocess.run(["node", "--check", str(STATIC / "editor.js")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
