"""The adapter registry: LoRA adapters (GGUF files) for a base model, their provenance and eval figures.

An adapter file lives in <data_dir>/adapters/<name>.gguf; its row in the `adapters` table appears
only once the file is complete and loads. Every adapter names the sha256 of the base GGUF it was
trained on, and `lora_path_for` refuses to hand it to another base. Torch is never imported here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from dialog import InvalidInput, NotFound, Store
from dialog.store import now

from .gguf_file import META_CARD, META_RECORD, record_strings, rewrite_metadata

ADAPTERS_DIR = "adapters"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_JSON = ("export", "hyperparameters", "training", "eval_before", "eval_after")
EVAL_ROLES = ("base", "adapter")


class AdapterError(InvalidInput):
    """Bad adapter input: the message says what to do next."""


class BaseMismatch(AdapterError):
    """The adapter was trained on another base model than the one it is being loaded onto."""

    status = 409


def check_name(name: Any) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise AdapterError(f"Adapter name {name!r} is not allowed: use 1 to 64 letters, digits, '.', '_' or '-', "
                           "starting with a letter or digit (for example coder-fix-v1).")
    return name


def adapters_dir(store: Store) -> Path:
    return Path(store.data_dir) / ADAPTERS_DIR


def adapter_path(store: Store, name: str) -> Path:
    return adapters_dir(store) / f"{check_name(name)}.gguf"


def _decode(row: dict) -> dict:
    row = dict(row)
    for k in _JSON:
        if isinstance(row.get(k), str):
            row[k] = json.loads(row[k])
    return row


def get(store: Store, name: str) -> dict:
    rows = store.rows("adapters", "name = ?", (check_name(name),))
    if not rows:
        known = [r["name"] for r in store.rows("adapters", select="name", order_by="name")]
        hint = f" Known adapters: {', '.join(known)}." if known else " There are none yet: train one with " \
            "`python -m execfeedback finetune --out NAME`."
        raise NotFound(f"There is no adapter {name!r}.{hint}")
    rec = _decode(rows[0])
    rec["path"] = str(adapters_dir(store) / rec["file_name"])
    return rec


def exists(store: Store, name: str) -> bool:
    return bool(store.rows("adapters", "name = ?", (check_name(name),), select="1"))


def list_adapters(store: Store, base_sha256: str | None = None) -> list[dict]:
    where, params = ("base_sha256 = ?", (base_sha256,)) if base_sha256 else (None, ())
    out = []
    for row in store.rows("adapters", where, params, order_by="name"):
        rec = _decode(row)
        rec["path"] = str(adapters_dir(store) / rec["file_name"])
        out.append(rec)
    return out


def register(store: Store, record: dict, *, replace: bool = False) -> dict:
    """Insert (or, with replace, overwrite) an adapter row; the file must already be in place."""
    name = check_name(record["name"])
    path = adapters_dir(store) / record["file_name"]
    if not path.is_file():
        raise AdapterError(f"Adapter file {path} is missing; nothing was registered.")
    row = {k: (json.dumps(record.get(k) or {}, ensure_ascii=False) if k in _JSON else record.get(k))
           for k in ("name", "file_name", "sha256", "size_bytes", "base_model", "base_file", "base_sha256",
                     "architecture", "method", "source", *_JSON)}
    row["method"] = row["method"] or "sft"
    row["source"] = row["source"] or "trained"
    ts = now()
    with store.transaction() as db:
        if db["adapters"].count_where("name = ?", (name,)):
            if not replace:
                raise AdapterError(f"An adapter named {name!r} exists already. Choose another name, or pass "
                                   "--replace to overwrite it.")
            db["adapters"].delete_where("name = ?", (name,))
        db["adapters"].insert({**row, "created_at": ts, "updated_at": ts})
    return get(store, name)


def remove(store: Store, name: str, *, delete_file: bool = True) -> dict:
    rec = get(store, name)
    with store.transaction() as db:
        db["adapters"].delete_where("name = ?", (rec["name"],))
    if delete_file:
        Path(rec["path"]).unlink(missing_ok=True)
    return rec


def check_base(record: dict, base_sha256: str | None, base_label: str = "this model") -> None:
    """Refuse an adapter trained on another base (a LoRA only makes sense on the weights it was trained on)."""
    if not base_sha256:
        raise AdapterError(f"Adapter {record['name']!r} needs an in-process GGUF base model (llama backend); "
                           f"{base_label} has no file sha256 to check it against.")
    if base_sha256 != record["base_sha256"]:
        raise BaseMismatch(
            f"Adapter {record['name']!r} was trained on {record['base_file']} (sha256 {record['base_sha256'][:12]}...) "
            f"but {base_label} has sha256 {base_sha256[:12]}.... Load it onto its own base "
            f"(--model {record.get('base_model') or record['base_file']}), or train an adapter for this model.")


def lora_path_for(store: Store, name: str, base_sha256: str | None, *, base_label: str = "this model",
                  verify_file: bool = True) -> str:
    """The path to pass as load_backend(..., lora_path=...), after checking the adapter fits this base.

    `base_sha256` is the sha256 of the base GGUF that will be loaded (the backend manifest's
    "sha256", or local_model.gguf.cached_sha256 of the resolved path).
    """
    rec = get(store, name)
    check_base(rec, base_sha256, base_label)
    path = Path(rec["path"])
    if not path.is_file():
        raise AdapterError(f"Adapter {name!r} is registered but its file {path} is gone. Remove it "
                           f"(`python -m execfeedback adapter remove {name}`) and train or import it again.")
    if verify_file and path.stat().st_size != rec["size_bytes"]:
        raise AdapterError(f"Adapter file {path} has changed since it was registered ({path.stat().st_size} bytes, "
                           f"expected {rec['size_bytes']}). Import or train it again.")
    return str(path)


def resolve_adapter(store: Store, name: str, *, model: str | os.PathLike | None = None,
                    manifest: dict | None = None, data_dir: str | os.PathLike | None = None) -> tuple[str, dict]:
    """(lora_path, manifest entries) for running adapter `name` on a base, checked against its sha256.

    Give the base as the manifest of a loaded llama backend (its "sha256") or as a model name or
    GGUF path, resolved the way load_backend resolves it. Raises AdapterError / BaseMismatch / NotFound.
    """
    if manifest is not None:
        sha, label = manifest.get("sha256"), manifest.get("file_name") or manifest.get("model") or "this model"
    else:
        from local_model import ModelError, resolve
        from local_model.gguf import cached_sha256
        from local_model.registry import sha_cache_file

        try:
            resolved = resolve(model, data_dir)
        except ModelError as e:
            raise AdapterError(str(e)) from None
        sha, label = cached_sha256(resolved.path, sha_cache_file(data_dir)), resolved.path.name
    path = lora_path_for(store, name, sha, base_label=label)
    return path, manifest_entry(get(store, name))


def manifest_entry(record: dict) -> dict:
    """What an attempt's model manifest should say about the adapter it ran with."""
    return {"adapter": record["name"], "adapter_sha256": record["sha256"], "adapter_method": record["method"]}


# -- eval figures ------------------------------------------------------------------------------------

def eval_figures(results: dict) -> dict:
    """The figures worth keeping from an eval results JSON (or its summary)."""
    s = results.get("summary", results)
    keep = ("run_name", "n", "complete", "pass_by_round", "pass_counts_by_round", "regressions", "fix_rate_by_error",
            "problems_sha256", "model")
    out = {k: s[k] for k in keep if k in s}
    cfg = s.get("config") or {}
    out["config"] = {k: cfg[k] for k in ("rounds", "candidates", "retry", "temperature", "max_tokens") if k in cfg}
    if s.get("problems_path"):
        out["problems_file"] = Path(s["problems_path"]).name
    return out


def record_eval(store: Store, name: str, results: dict, *, role: str) -> dict:
    """Keep an eval's figures on the adapter: role "base" (the base alone) or "adapter" (base + adapter)."""
    if role not in EVAL_ROLES:
        raise AdapterError(f"role must be one of {', '.join(EVAL_ROLES)}")
    rec = get(store, name)
    column = "eval_before" if role == "base" else "eval_after"
    figures = {**eval_figures(results), "recorded_at": now()}
    with store.transaction() as db:
        db["adapters"].update(rec["id"], {column: json.dumps(figures, ensure_ascii=False), "updated_at": now()})
    return get(store, name)


# -- the card and the shareable file -------------------------------------------------------------------

def _pct(x: Any) -> str:
    return f"{100 * x:.1f}%" if isinstance(x, (int, float)) else "-"


def card(record: dict) -> str:
    """A markdown card: what the adapter is, what it was trained on, how, and how it scored."""
    h, t, e = record.get("hyperparameters") or {}, record.get("training") or {}, record.get("export") or {}
    lines = [f"# Loopbook adapter `{record['name']}`", "",
             f"A LoRA adapter (GGUF, for llama.cpp) for **{record.get('base_model') or record['base_file']}**, "
             f"trained by Loopbook ({record.get('method', 'sft')}) on its own execution-feedback traces.", "",
             "## Base model", "",
             f"- file: `{record['base_file']}`",
             f"- sha256: `{record['base_sha256']}` (Loopbook refuses to load the adapter onto another file)",
             f"- architecture: {record['architecture']}", "",
             "## Use it", "",
             "```python",
             "from llama_cpp import Llama",
             f"llm = Llama(model_path={record['base_file']!r}, lora_path={record['file_name']!r})",
             "```",
             f"or `python -m execfeedback adapter import {record['file_name']}` into a Loopbook data directory.", "",
             "## Training data", ""]
    files = e.get("files") or {}
    lines += [f"- export hash: `{e.get('hash', '-')}`"]
    lines += [f"- {k}: {v} rows" for k, v in files.items()]
    if e.get("used_rows") is not None:
        lines += [f"- rows trained on: {e['used_rows']} (left out as too long: {e.get('too_long', 0)})"]
    if e.get("filters"):
        lines += [f"- filters: {json.dumps(e['filters'], ensure_ascii=False)}"]
    if e.get("train_tasks") is not None:
        lines += [f"- training tasks: {len(e['train_tasks'])} (`eval --adapter` leaves problems with these ids out)"]
    if e.get("split"):
        lines += [f"- held-out split: {json.dumps(e['split'], ensure_ascii=False)}"]
    lines += ["", "## Hyperparameters", ""]
    lines += [f"- {k}: {v}" for k, v in h.items()]
    if t:
        lines += ["", "## Training run", ""]
        for k in ("device", "dtype", "steps", "epochs_done", "train_tokens", "train_s", "tokens_per_s", "loss_first",
                  "loss_last", "train_loss_before", "train_loss_after", "test_loss_before", "test_loss_after",
                  "epoch_test_losses", "kept_epoch", "no_held_out_gain", "dpo_steps", "torch", "transformers", "peft"):
            if t.get(k) is not None:
                lines.append(f"- {k}: {t[k]}")
    lines += ["", "## Evaluation (pass@1 after each feedback round)", ""]
    before, after = record.get("eval_before") or {}, record.get("eval_after") or {}
    if before.get("pass_by_round") or after.get("pass_by_round"):
        pb, pa = before.get("pass_by_round") or [], after.get("pass_by_round") or []
        lines += ["| round | base | base + adapter |", "| --- | --- | --- |"]
        for r in range(max(len(pb), len(pa))):
            lines.append(f"| {r} | {_pct(pb[r] if r < len(pb) else None)} | {_pct(pa[r] if r < len(pa) else None)} |")
        lines += ["", f"Problems: base run `{before.get('run_name', '-')}` ({before.get('n', '-')} problems), adapter "
                      f"run `{after.get('run_name', '-')}` ({after.get('n', '-')} problems)."]
    else:
        lines.append("Not evaluated yet: `python -m execfeedback eval HELD_OUT.jsonl --model BASE --adapter "
                     f"{record['name']}`.")
    return "\n".join(lines) + "\n"


def _public_record(record: dict) -> dict:
    """The record as shared: no local paths, no store ids."""
    drop = {"id", "path"}
    rec = {k: v for k, v in record.items() if k not in drop}
    exp = dict(rec.get("export") or {})
    exp.pop("dir", None)
    rec["export"] = exp
    return rec


def export_adapter(store: Store, name: str, out: str | os.PathLike) -> tuple[Path, Path]:
    """Write <out>/<name>.gguf (the card and record inside its metadata) and <out>/<name>.md."""
    rec = get(store, name)
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise AdapterError(f"--out {out} is a file; give a directory.")
    out.mkdir(parents=True, exist_ok=True)
    target = out / f"{rec['name']}.gguf"
    text = card(rec)
    src = Path(lora_path_for(store, name, rec["base_sha256"]))
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        _copy_with_metadata(src, tmp, record_strings(_public_record(rec), text))
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    md = out / f"{rec['name']}.md"
    md.write_text(text, encoding="utf-8")
    return target, md


def _copy_with_metadata(src: Path, dst: Path, strings: dict[str, str]) -> None:
    """Copy a GGUF, setting string metadata; without the gguf package the file is copied as it is."""
    try:
        import gguf  # noqa: F401
    except ImportError:
        shutil.copyfile(src, dst)
        return
    rewrite_metadata(src, dst, strings)


def read_embedded(path: str | os.PathLike) -> dict:
    """The record and card inside an adapter GGUF (empty when it carries none)."""
    from local_model.gguf import is_gguf, read_metadata

    if not is_gguf(path):
        raise AdapterError(f"{path} is not a GGUF file; an adapter is shared as one .gguf file.")
    meta = read_metadata(path)
    if meta.get("general.type") != "adapter" or meta.get("adapter.type") != "lora":
        raise AdapterError(f"{path} is a GGUF but not a LoRA adapter (general.type is "
                           f"{meta.get('general.type')!r}); a base model cannot be imported as an adapter.")
    out: dict = {"architecture": meta.get("general.architecture"), "alpha": meta.get("adapter.lora.alpha")}
    if isinstance(meta.get(META_RECORD), str):
        out["record"] = json.loads(meta[META_RECORD])
    if isinstance(meta.get(META_CARD), str):
        out["card"] = meta[META_CARD]
    return out


def import_adapter(store: Store, path: str | os.PathLike, *, name: str | None = None, replace: bool = False) -> dict:
    """Copy a shared adapter file into the data directory and register it (its base sha256 comes with it)."""
    from local_model.gguf import sha256_file

    src = Path(path).expanduser()
    if not src.is_file():
        raise AdapterError(f"{src}: no such file.")
    embedded = read_embedded(src)
    rec = embedded.get("record")
    if not rec or not rec.get("base_sha256"):
        raise AdapterError(f"{src} carries no Loopbook record (no base model sha256), so Loopbook cannot check which "
                           "base it belongs to. Export it with `python -m execfeedback adapter export`.")
    name = check_name(name or rec["name"])
    if exists(store, name) and not replace:
        raise AdapterError(f"An adapter named {name!r} exists already. Pass --name to import it under another name, "
                           "or --replace.")
    folder = adapters_dir(store)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{name}.gguf"
    tmp = target.with_name(f".{target.name}.import.tmp")
    shutil.copyfile(src, tmp)
    try:
        os.replace(tmp, target)
        rec = {**rec, "name": name, "file_name": target.name, "sha256": sha256_file(target),
               "size_bytes": target.stat().st_size, "source": "imported"}
        return register(store, rec, replace=replace)
    except BaseException:
        tmp.unlink(missing_ok=True)
        if not exists(store, name):
            target.unlink(missing_ok=True)
        raise
