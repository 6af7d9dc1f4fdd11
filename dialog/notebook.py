"""Notebook files in and out: a dialog as .ipynb (round trip), as a percent-format .py and as markdown."""

from __future__ import annotations

import ast
import copy
import json
import math
import re
import sys
from typing import Any, Callable, Iterator

import nbformat

from .render import IMAGE_MIMES, text_of
from .store import AUTHORS, MAX_TITLE, InvalidInput, Store, StoreError, lone_surrogate

MAX_IMPORT_BYTES = 50 * 1024 * 1024
LOOPBOOK_KEY = "loopbook"
FORMAT_VERSION = 1
DEFAULT_TITLE = "Imported notebook"

KERNELSPEC = {"name": "python3", "display_name": "Python 3", "language": "python"}
LANGUAGE_INFO = {
    "name": "python",
    "version": ".".join(map(str, sys.version_info[:3])),
    "mimetype": "text/x-python",
    "file_extension": ".py",
    "pygments_lexer": "ipython3",
    "codemirror_mode": {"name": "ipython", "version": 3},
    "nbconvert_exporter": "python",
}
MEDIA_TYPES = {"ipynb": "application/x-ipynb+json", "py": "text/x-python", "md": "text/markdown"}

# Outputs that live only in a running session (clear_output, update_display_data) have no place in a file.
_FILE_OUTPUTS = ("stream", "display_data", "execute_result", "error")
_JSON_MIME = re.compile(r"^application/(.*\+)?json$")
# ANSI colour and cursor sequences, as IPython writes them into tracebacks.
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
_MAGIC_LINE = re.compile(r"^\s*[%!]")


def _int_or_none(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    # SQLite's INTEGER range: beyond it sqlite3 raises OverflowError instead of storing the number.
    if isinstance(value, int) and -2**63 <= value < 2**63:
        return value
    return None


# -- outputs ---------------------------------------------------------------------------------------


def _mimebundle(data: Any) -> dict:
    if not isinstance(data, dict):
        return {}
    out = {}
    for mime, value in data.items():
        if not isinstance(mime, str):
            continue
        if _JSON_MIME.match(mime):
            out[mime] = value
        elif isinstance(value, (str, list)):
            out[mime] = text_of(value)
        else:
            out[mime] = json.dumps(value)
    return out


def clean_output(output: Any, execution_count: int | None = None) -> dict | None:
    """One output in the nbformat v4 file shape, or None for what a file cannot hold."""
    if not isinstance(output, dict) or output.get("output_type") not in _FILE_OUTPUTS:
        return None
    kind = output["output_type"]
    if kind == "stream":
        name = output.get("name") if output.get("name") in ("stdout", "stderr") else "stdout"
        return {"output_type": "stream", "name": name, "text": text_of(output.get("text"))}
    if kind == "error":
        tb = output.get("traceback")
        return {"output_type": "error", "ename": text_of(output.get("ename")), "evalue": text_of(output.get("evalue")),
                "traceback": [text_of(line) for line in tb] if isinstance(tb, list) else []}
    metadata = output.get("metadata")
    out = {"output_type": kind, "data": _mimebundle(output.get("data")),
           "metadata": metadata if isinstance(metadata, dict) else {}}
    if kind == "execute_result":
        count = _int_or_none(output.get("execution_count"))
        out["execution_count"] = count if count is not None else execution_count
    return out


def _clean_outputs(outputs: Any, execution_count: int | None = None) -> tuple[list[dict], int]:
    """(kept outputs, number dropped)."""
    if not isinstance(outputs, list):
        return [], 0
    kept = [o for o in (clean_output(o, execution_count) for o in outputs) if o is not None]
    return kept, len(outputs) - len(kept)


# -- export ----------------------------------------------------------------------------------------


def _quote(text: str) -> str:
    return "\n".join(f"> {line}" if line.strip() else ">" for line in text.split("\n"))


def prompt_markdown(prompt: str, reply: str) -> str:
    """How a prompt and its reply read as markdown (in Jupyter, in .md and in .py exports)."""
    text = "> **Prompt**\n>\n" + _quote(prompt)
    if reply:
        text += "\n\n**Reply**\n\n" + reply
    return text


def _flags(m: dict) -> dict:
    return {"pinned": bool(m["pinned"]), "skipped": bool(m["skipped"]), "is_test": bool(m["is_test"]),
            "author": m["author"]}


def notebook(store: Store, dialog_id: Any) -> nbformat.NotebookNode:
    """The dialog as a validated nbformat 4.5 notebook."""
    d = store.get_dialog(dialog_id)
    cells = []
    for m in store.messages(d["id"]):
        marker = {"type": m["type"], **_flags(m)}
        # Plain dicts, validated once at the end: nbformat's new_*_cell validate each cell (2 ms apiece).
        cell: dict[str, Any] = {"id": f"lb-{m['id']}", "cell_type": "markdown", "metadata": {LOOPBOOK_KEY: marker},
                                "source": m["source"]}
        if m["type"] == "code":
            count = _int_or_none(m["execution_count"])
            if m["output_meta"]:
                marker["output_meta"] = m["output_meta"]
            cell.update(cell_type="code", execution_count=count, outputs=_clean_outputs(m["outputs"], count)[0])
        elif m["type"] == "prompt":
            marker.update(prompt=m["source"], reply=m["reply"], reply_meta=m["reply_meta"])
            cell["source"] = prompt_markdown(m["source"], m["reply"])
        cells.append(cell)
    nb = nbformat.from_dict({
        "nbformat": 4, "nbformat_minor": 5, "cells": cells,
        "metadata": {"kernelspec": dict(KERNELSPEC), "language_info": copy.deepcopy(LANGUAGE_INFO),
                     LOOPBOOK_KEY: {"format": FORMAT_VERSION, "title": d["title"], "settings": d["settings"]}},
    })
    nbformat.validate(nb)
    return nb


def export_ipynb(store: Store, dialog_id: Any) -> str:
    """The dialog as .ipynb JSON text (nbformat 4.5, valid under nbformat.validate)."""
    return nbformat.writes(notebook(store, dialog_id), version=4)


# Python ends a line at \n, \r\n and a lone \r alike: a comment split only at \n would let a note holding
# "# x\rprint(1)" run its second half. Editors and str.splitlines() break at more (\v, \f, \x1c-\x1e, \x85,
# \u2028, \u2029); breaking the comment there too keeps what a reader sees and what Python runs the same.
_LINE_BREAK = re.compile(r"\r\n|[\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029]")


_PY_LINE_BREAK = re.compile(r"\r\n|[\r\n]")


def _comment(text: str) -> str:
    return "\n".join(f"# {line}" if line else "#" for line in _LINE_BREAK.split(text))


def parses(code: str) -> bool:
    """Whether the text is Python that compiles to a syntax tree."""
    try:
        ast.parse(code)
    except (SyntaxError, ValueError):
        return False
    return True


def _py_code(source: str) -> str:
    """A code cell as Python: as it is, else with IPython magics and shell lines commented (as Jupytext
    does), else wholly commented, so the script always parses."""
    if parses(source):
        return source
    escaped = "\n".join(f"# {line}" if _MAGIC_LINE.match(line) else line for line in _PY_LINE_BREAK.split(source))
    if parses(escaped):
        return escaped
    return "# (this cell is not valid Python, so it is kept as comments)\n" + _comment(source)


def export_py(store: Store, dialog_id: Any) -> str:
    """The dialog as a percent-format script (`# %%` cells) that Jupytext, VS Code and PyCharm read."""
    d = store.get_dialog(dialog_id)
    header = ["# ---", "# jupyter:", "#   kernelspec:", "#     display_name: Python 3", "#     language: python",
              "#     name: python3", "#   loopbook:", f"#     title: {json.dumps(d['title'])}", "# ---"]
    parts = ["\n".join(header)]
    for m in store.messages(d["id"]):
        if m["type"] == "code":
            parts.append("# %%\n" + _py_code(m["source"].rstrip("\n")))
        else:
            text = prompt_markdown(m["source"], m["reply"]) if m["type"] == "prompt" else m["source"]
            parts.append("# %% [markdown]\n" + _comment(text.rstrip("\n")))
    return "\n\n".join(parts) + "\n"


def _fence(text: str, lang: str = "") -> str:
    runs = [len(r) for r in re.findall(r"`{3,}", text)]
    ticks = "`" * max(3, max(runs, default=0) + 1)
    return f"{ticks}{lang}\n{text.rstrip(chr(10))}\n{ticks}"


def _md_output(output: dict) -> str | None:
    kind = output["output_type"]
    if kind == "stream":
        return _fence(_ANSI.sub("", output["text"])) if output["text"] else None
    if kind == "error":
        tb = "\n".join(output["traceback"]) or f"{output['ename']}: {output['evalue']}"
        return _fence(_ANSI.sub("", tb))
    data = output["data"]
    for mime in IMAGE_MIMES:
        if mime in data:
            return f"![{mime} output](data:{mime};base64,{data[mime].replace(chr(10), '')})"
    if "text/markdown" in data:
        return data["text/markdown"]
    if "text/plain" in data:
        return _fence(_ANSI.sub("", data["text/plain"]))
    if data:
        return f"*({', '.join(sorted(data))} output: open the .ipynb export to see it)*"
    return None


def export_md(store: Store, dialog_id: Any) -> str:
    """The dialog as markdown: notes as they are, code fenced with its text outputs, prompts quoted with replies."""
    d = store.get_dialog(dialog_id)
    parts = [f"# {d['title']}"]
    for m in store.messages(d["id"]):
        if m["type"] == "note":
            parts.append(m["source"].rstrip("\n"))
        elif m["type"] == "prompt":
            parts.append(prompt_markdown(m["source"], m["reply"]).rstrip("\n"))
        else:
            parts.append(_fence(m["source"], "python"))
            outputs, _ = _clean_outputs(m["outputs"], m["execution_count"])
            parts.extend(p for p in map(_md_output, outputs) if p)
    return "\n\n".join(p for p in parts if p) + "\n"


def export_filename(title: str, fmt: str) -> str:
    """A safe file name for a download (Content-Disposition) from a dialog title."""
    stem = re.sub(r"[^\w.-]+", "_", title, flags=re.ASCII).strip("._")[:80] or "dialog"
    return f"{stem}.{fmt}"


def export_dialog(store: Store, dialog_id: Any, fmt: str = "ipynb") -> tuple[str, str, str]:
    """(text, media type, file name) of a dialog exported as 'ipynb', 'py' or 'md'."""
    exporters = {"ipynb": export_ipynb, "py": export_py, "md": export_md}
    if fmt not in exporters:
        raise InvalidInput(f"Export format must be one of {', '.join(exporters)}; got {fmt!r}.")
    text = exporters[fmt](store, dialog_id)
    return text, MEDIA_TYPES[fmt], export_filename(store.get_dialog(dialog_id)["title"], fmt)


# -- import ----------------------------------------------------------------------------------------


def _mb(n: int) -> str:
    return f"{n / 2**20:,.1f}".removesuffix(".0")


def _decode(data: bytes | str, max_bytes: int) -> str:
    size = len(data.encode("utf-8", "surrogatepass")) if isinstance(data, str) else len(data)
    if size > max_bytes:
        raise InvalidInput(
            f"This notebook is {_mb(size)} MB, over the {_mb(max_bytes)} MB import limit. Clear its "
            "outputs in Jupyter (Edit > Clear All Outputs), save it, and import it again."
        )
    if isinstance(data, (bytes, bytearray, memoryview)):
        try:
            data = bytes(data).decode("utf-8-sig")
        except UnicodeDecodeError:
            raise InvalidInput("This file is not UTF-8 text, so it is not an .ipynb notebook. "
                               "Choose a notebook saved by Jupyter, Colab or VS Code.") from None
    if not data.strip():
        raise InvalidInput("This file is empty. Choose an .ipynb notebook saved by Jupyter, Colab or VS Code.")
    return data


def _parse(text: str) -> dict:
    try:
        nb = json.loads(text)
    except json.JSONDecodeError as e:
        if e.pos >= len(text.rstrip()) or not text.rstrip().endswith("}"):
            raise InvalidInput(
                "This .ipynb ends early: the file looks truncated (an interrupted download or copy). "
                "Download or save it again and import the complete file; nothing was imported."
            ) from None
        raise InvalidInput(
            f"This .ipynb is not valid JSON ({e.msg}: line {e.lineno}, column {e.colno}); the file is damaged. "
            "Save it again from Jupyter and retry; nothing was imported."
        ) from None
    if not isinstance(nb, dict) or not isinstance(nb.get("nbformat"), int) or not (
            "cells" in nb or "worksheets" in nb):
        raise InvalidInput(
            "This file is JSON but not a Jupyter notebook (it has no 'nbformat' and 'cells'). "
            "Choose an .ipynb file saved by Jupyter, Colab or VS Code."
        )
    return nb


def _upgrade(raw: dict, text: str) -> dict:
    """nbformat 4 as it is; nbformat 3 through nbformat's own converter."""
    major = raw["nbformat"]
    if major == 4:
        return raw
    if major > 4:
        raise InvalidInput(f"This is an nbformat {major} notebook, newer than Loopbook reads (4). "
                           "Save it as nbformat 4 from Jupyter and import that.")
    how = "open and save it in Jupyter to upgrade it"
    if major != 3:
        raise InvalidInput(f"This is an nbformat {major} notebook, older than Loopbook reads; {how}.")
    try:
        nb = nbformat.reads(text, as_version=4)
    except Exception:
        raise InvalidInput(f"This is an nbformat 3 notebook that could not be upgraded; {how}.") from None
    if not isinstance(nb.get("cells"), list):
        raise InvalidInput(f"This is an nbformat 3 notebook that could not be upgraded; {how}.")
    return nb


def _title(raw: dict, nb: dict, title: str | None) -> str:
    meta = nb.get("metadata") if isinstance(nb.get("metadata"), dict) else {}
    marker = meta.get(LOOPBOOK_KEY) if isinstance(meta.get(LOOPBOOK_KEY), dict) else {}
    raw_meta = raw.get("metadata") if isinstance(raw.get("metadata"), dict) else {}
    colab = meta.get("colab") if isinstance(meta.get("colab"), dict) else {}
    for candidate in (title, marker.get("title"), colab.get("name"), raw_meta.get("name")):
        if isinstance(candidate, str) and candidate.strip():
            name = candidate.strip()
            if name.lower().endswith(".ipynb"):
                name = name[:-6].strip() or name
            return name[:MAX_TITLE].strip()
    return DEFAULT_TITLE


# Loopbook's own metadata, as a file may hold it: the page renders these fields, so each known one must have
# its type (or it is left out); unknown ones are kept as they are (nothing reads them).
def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_count(v: Any) -> bool:
    return _int_or_none(v) is not None and not isinstance(v, float) and v >= 0


def _is_word(v: Any) -> bool:
    return isinstance(v, str) and re.fullmatch(r"[a-z_]{1,32}", v) is not None


def _is_text_or_none(v: Any) -> bool:
    return v is None or isinstance(v, str)


_FIGURES = ("ttft_s", "prompt_tokens", "cached_prompt_tokens", "prompt_eval_s", "completion_tokens", "decode_s",
            "tokens_per_s", "total_s")
_OUTPUT_META = {"status": _is_word, "duration_s": _is_number, "truncated": lambda v: isinstance(v, bool),
                "original_chars": _is_count, "message": _is_text_or_none, "empty": lambda v: isinstance(v, bool),
                "trace_id": _is_count}
_REPLY_META = {"status": _is_word, "request_id": _is_text_or_none, "model": _is_text_or_none,
               "backend": _is_text_or_none, "error": _is_text_or_none, "finish_reason": _is_text_or_none,
               "solve": _is_text_or_none, "trace_id": _is_count, "code_message_id": _is_count,
               "edited_by_hand": lambda v: isinstance(v, bool), "sampling": lambda v: isinstance(v, dict),
               "figures": lambda v: isinstance(v, dict)}


def _clean_meta(meta: dict, rules: dict) -> tuple[dict, int]:
    """(meta with every known field of the right type, number of fields left out)."""
    out, dropped = {}, 0
    for key, value in meta.items():
        check = rules.get(key)
        if check is not None and not check(value):
            dropped += 1
            continue
        out[key] = value
    if isinstance(out.get("figures"), dict):
        figures = {k: v for k, v in out["figures"].items() if k not in _FIGURES or v is None or _is_number(v)}
        dropped += len(out["figures"]) - len(figures)
        out["figures"] = figures
    if out.get("status") == "streaming":
        out["status"] = "interrupted"  # no stream is writing it here
    return out, dropped


def _clean_settings(settings: Any, check: Callable[[dict], None] | None, notices: list[str]) -> dict | None:
    """The dialog settings a file brings, each one that `check` (the app's own rules) accepts."""
    if not isinstance(settings, dict):
        return None
    if check is None:
        return settings
    kept, left_out = {}, []
    for key, value in settings.items():
        if value is None:  # "the app default": nothing to keep
            continue
        try:
            check({key: value})
        except StoreError:
            left_out.append(str(key))
        else:
            kept[key] = value
    try:
        check(kept)
    except StoreError:
        left_out, kept = left_out + list(kept), {}
    if left_out:
        notices.append(f"{len(left_out)} dialog setting(s) not valid here were left out: "
                       f"{', '.join(sorted(left_out))[:300]}.")
    return kept


def _marker(cell: dict) -> dict:
    meta = cell.get("metadata")
    marker = meta.get(LOOPBOOK_KEY) if isinstance(meta, dict) else None
    return marker if isinstance(marker, dict) else {}


def _flag_fields(marker: dict) -> dict:
    fields: dict[str, Any] = {k: marker[k] for k in ("pinned", "skipped", "is_test") if isinstance(marker.get(k), bool)}
    if marker.get("author") in AUTHORS:
        fields["author"] = marker["author"]
    return fields


def _inline_attachments(source: str, attachments: Any) -> str:
    # Jupyter stores pasted images beside the cell; as data URLs they survive in a dialog.
    if not isinstance(attachments, dict):
        return source
    for name, bundle in attachments.items():
        if not isinstance(bundle, dict):
            continue
        mime = next((m for m in bundle if isinstance(m, str) and m.startswith("image/")), None)
        if mime and isinstance(bundle[mime], (str, list)):
            url = f"data:{mime};base64,{text_of(bundle[mime]).replace(chr(10), '')}"
            source = source.replace(f"attachment:{name}", url)
    return source


def _cell_source(cell: dict, number: int) -> str:
    source = cell.get("source", "")
    if isinstance(source, list) and all(isinstance(s, str) for s in source):
        return "".join(source)
    if isinstance(source, str):
        return source
    raise InvalidInput(f"Cell {number} of this notebook is damaged: its source is neither text nor a list of "
                       "lines. Fix or delete that cell in Jupyter and import again; nothing was imported.")


def _same_text(a: str, b: str) -> bool:
    # Editors re-save with other line endings or trailing spaces; that is not an edit of the prompt.
    def norm(t: str) -> str:
        return "\n".join(line.rstrip() for line in t.replace("\r\n", "\n").split("\n")).strip()
    return norm(a) == norm(b)


def _messages(cells: list, notices: list[str]) -> Iterator[tuple[str, str, dict]]:
    """(type, source, fields) for each cell, read lazily so a damaged cell stops the import where it is."""
    raw_cells = dropped_outputs = edited_prompts = unknown = bad_meta = 0
    for number, cell in enumerate(cells, start=1):
        if not isinstance(cell, dict):
            raise InvalidInput(f"Cell {number} of this notebook is damaged (it is not a JSON object). "
                               "Fix or delete it in Jupyter and import again; nothing was imported.")
        kind = cell.get("cell_type")
        source = _cell_source(cell, number)
        marker = _marker(cell)
        fields = _flag_fields(marker)
        if kind == "code":
            count = _int_or_none(cell.get("execution_count"))
            outputs, dropped = _clean_outputs(cell.get("outputs"), count)
            dropped_outputs += dropped
            fields.update(outputs=outputs, execution_count=count)
            if isinstance(marker.get("output_meta"), dict):
                fields["output_meta"], dropped = _clean_meta(marker["output_meta"], _OUTPUT_META)
                bad_meta += dropped
            yield "code", source, fields
        elif kind == "markdown":
            if marker.get("type") == "prompt" and isinstance(marker.get("prompt"), str):
                reply = marker.get("reply") if isinstance(marker.get("reply"), str) else ""
                if _same_text(source, prompt_markdown(marker["prompt"], reply)):
                    fields["reply"] = reply
                    if isinstance(marker.get("reply_meta"), dict):
                        fields["reply_meta"], dropped = _clean_meta(marker["reply_meta"], _REPLY_META)
                        bad_meta += dropped
                    yield "prompt", marker["prompt"], fields
                    continue
                edited_prompts += 1  # changed outside Loopbook: the person's text wins, as a note
            yield "note", _inline_attachments(source, cell.get("attachments")), fields
        elif kind == "raw":
            raw_cells += 1
            if source.strip():
                yield "note", "Raw cell from the notebook:\n\n" + _fence(source), fields
        else:
            unknown += 1
    if raw_cells:
        notices.append(f"{raw_cells} raw cell(s) became notes showing their text (empty ones were left out).")
    if edited_prompts:
        notices.append(f"{edited_prompts} Loopbook prompt cell(s) were edited outside Loopbook and came in as notes.")
    if dropped_outputs:
        notices.append(f"{dropped_outputs} output(s) of an unknown kind were left out.")
    if unknown:
        notices.append(f"{unknown} cell(s) of an unknown type were left out.")
    if bad_meta:
        notices.append(f"{bad_meta} Loopbook metadata field(s) of the wrong type (figures, statuses, counts) were "
                       "left out.")


def import_ipynb(store: Store, data: bytes | str, title: str | None = None, *,
                 max_bytes: int = MAX_IMPORT_BYTES, check_settings: Callable[[dict], None] | None = None) -> dict:
    """A new dialog from an .ipynb file (Jupyter, Colab, VS Code; nbformat 3 or 4), all in one transaction.

    Returns the dialog as the store gives it, plus `n_messages` and `notices` (what was changed on the way).
    Raises InvalidInput, with nothing written, for a file that is too big, damaged or not a notebook.
    `check_settings`: raises StoreError for dialog settings the app would refuse; those are left out.
    """
    text = _decode(data, max_bytes)
    raw = _parse(text)
    bad = lone_surrogate([raw, title])
    if bad is not None:
        raise InvalidInput(f"This notebook holds a lone surrogate ({bad!r}), which is not valid Unicode text, so "
                           "nothing was imported. Fix that text in Jupyter (it is often a broken emoji), save, and "
                           "import again.")
    nb = _upgrade(raw, text)
    cells = nb.get("cells")
    if not isinstance(cells, list):
        raise InvalidInput("This notebook is damaged: its 'cells' is not a list. Save it again from Jupyter "
                           "and retry; nothing was imported.")
    notices: list[str] = []
    if raw["nbformat"] == 3:
        notices.append("This nbformat 3 notebook was upgraded to nbformat 4 on the way in.")
    meta = nb.get("metadata") if isinstance(nb.get("metadata"), dict) else {}
    spec = meta.get("kernelspec") if isinstance(meta.get("kernelspec"), dict) else {}
    info = meta.get("language_info") if isinstance(meta.get("language_info"), dict) else {}
    language = spec.get("language") or info.get("name")
    if isinstance(language, str) and language.lower() not in ("python", "python3", ""):
        notices.append(f"This notebook's kernel language is {language}; Loopbook runs Python, so its code cells "
                       "may not run as they are.")
    marker = meta.get(LOOPBOOK_KEY) if isinstance(meta.get(LOOPBOOK_KEY), dict) else {}
    settings = _clean_settings(marker.get("settings"), check_settings, notices)
    with store.transaction():
        dialog = store.create_dialog(_title(raw, nb, title), settings)
        n = 0
        for type_, source, fields in _messages(cells, notices):
            store.add_message(dialog["id"], type_, source, **fields)
            n += 1
        dialog = store.get_dialog(dialog["id"])
    return {**dialog, "n_messages": n, "notices": notices}
