"""One fine-tuning run: a LoRA adapter for the local GGUF model, trained on the store's traces, end to end.

Exports the solved traces (task-held-out split), trains a LoRA on the dequantized base (weighted SFT,
then optionally DPO on the preference pairs), converts it to a GGUF adapter, checks that llama.cpp
loads it onto the base, and registers it. A stopped run resumes from its checkpoint when the same
command runs again. Needs the train extra (torch, transformers, peft, gguf; trl for --dpo), imported
only inside the run: main() starts it in a process of its own (see training_process).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, fields
from datetime import datetime, timezone
from pathlib import Path

from ..adapters import registry as adapters
from ..adapters.gguf_file import record_strings
from ..traces import open_store
from .data import FinetuneError, check_enough, prepare_rows, read_export
from .training_process import run_own_process

TRAIN_EXTRA = ("pip install torch==2.13.0 && pip install 'transformers>=5,<6' 'peft>=0.15,<1' 'gguf>=0.10,<1' "
               "'accelerate>=1,<3' 'trl>=0.20,<2'  (install torch first: from the CPU or the CUDA index, as suits "
               "the machine)")
FILTER_KEYS = ("model", "backend", "dialog", "eval_run", "since", "until", "min_rounds", "max_rounds", "author",
               "exclude_eval_run", "split_by", "test_fraction")


def hyper_from_args(args: argparse.Namespace):
    """The training flags as Hyper (what has no flag keeps its default)."""
    from .train import Hyper

    return Hyper(**{f.name: getattr(args, f.name) for f in fields(Hyper) if hasattr(args, f.name)}).validate()


def require_train_extra(dpo: bool = False) -> dict:
    """Versions of the training libraries, or a FinetuneError that names what is missing or broken."""
    missing, broken, versions = [], [], {}
    for mod in ("torch", "transformers", "peft", "gguf", "safetensors", *(("trl", "datasets") if dpo else ())):
        try:
            m = __import__(mod)
            versions[mod] = getattr(m, "__version__", "?")
        except ModuleNotFoundError as e:
            if e.name == mod:
                missing.append(mod)
            else:
                broken.append(f"{mod} (ModuleNotFoundError: {e})")
        except Exception as e:  # noqa: BLE001 - any failure to import is reported with its cause
            broken.append(f"{mod} ({type(e).__name__}: {e})")
    if broken:
        raise FinetuneError(f"Fine-tuning could not import {'; '.join(broken)}. "
                            + (f"Also missing: {', '.join(missing)}. " if missing else "")
                            + f"Reinstall the train extra into Loopbook's environment: {TRAIN_EXTRA}")
    if missing:
        raise FinetuneError(f"Fine-tuning needs the train extra; missing: {', '.join(missing)}. Install it into "
                            f"Loopbook's environment: {TRAIN_EXTRA}")
    return versions


def _log(quiet: bool):
    return (lambda text: None) if quiet else (lambda text: print(text, file=sys.stderr, flush=True))


def _export(store, run_dir: Path, args, log) -> tuple[Path, dict]:
    """Export the solved traces into the run folder (reusing the one a stopped run started with)."""
    from ..export.exporter import ExportError, export_to_dir, options_from_mapping
    from .train import read_checkpoint_state

    out = run_dir / "export"
    filters = {k: getattr(args, k) for k in FILTER_KEYS if getattr(args, k, None) not in (None, [], False)}
    saved = run_dir / "export-filters.json"
    tasks_file = run_dir / "export-train-tasks.json"
    if not args.restart and read_checkpoint_state(run_dir) and (out / "sft.train.jsonl").is_file():
        log(f"Using the export this run started with ({out}); pass --restart to export again.")
        tasks = json.loads(tasks_file.read_text()) if tasks_file.is_file() else None
        return out, json.loads(saved.read_text()) if saved.is_file() else filters, tasks
    formats = ["sft", "preference"] if args.dpo else ["sft"]
    try:
        options = options_from_mapping({**filters, "format": formats, "outcome": "solved"})
        report = export_to_dir(store, out, options, force=True, progress=not args.quiet)
    except ExportError as e:
        text = str(e)
        if text.startswith(("No traces", "Nothing to write")):
            raise FinetuneError(f"No solved traces to train on. {text} Solve problems in the page, or generate traces "
                                f"on a training problem set: `python -m execfeedback eval TRAIN.jsonl --data-dir "
                                f"{store.data_dir}`.") from None
        raise FinetuneError(text) from None
    # Problem ids for eval traces, `request:<hash>` or `trace:<id>` for the rest (export/split.py: task_key).
    tasks = sorted(k.removeprefix("task:") for k in report.tasks["train"])
    tasks_file.write_text(json.dumps(tasks))
    saved.write_text(json.dumps(filters))
    return out, filters, tasks


def finetune(args: argparse.Namespace) -> int:
    name = adapters.check_name(args.out)
    log = _log(args.quiet)
    hyper = hyper_from_args(args)
    versions = require_train_extra(dpo=args.dpo)
    store = open_store(args.data_dir)
    try:
        return _finetune(store, name, args, hyper, versions, log)
    finally:
        store.close()


def _finetune(store, name: str, args, hyper, versions: dict, log) -> int:
    from peft import get_peft_model_state_dict

    from .base import load_base, resolve_base
    from .convert import convert, verify_loads
    from .train import RunSpec, add_lora, check_resumable, fingerprint, pick_device, train_sft

    t_start = time.perf_counter()
    data_dir = Path(store.data_dir)
    if adapters.exists(store, name) and not args.replace:
        raise adapters.AdapterError(f"An adapter named {name!r} exists already. Choose another --out, or pass "
                                    "--replace to train it again.")
    run_dir = data_dir / "finetune" / name
    if args.restart:
        shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True, exist_ok=True)

    # Data first: the cheap checks fail before the slow model load.
    if args.export:
        given = [k for k in FILTER_KEYS if getattr(args, k, None) not in (None, [], False)]
        if given:
            raise FinetuneError(f"--{given[0].replace('_', '-')} filters the store's traces, but --export names an "
                                "export that is already filtered. Leave one of them out.")
        data = read_export(args.export, need_preference=args.dpo)
        data.filters = {"export": str(Path(args.export).expanduser())}
        tasks = None  # a given export's rows do not say their task: eval cannot check overlap
    else:
        export_dir, filters, tasks = _export(store, run_dir, args, log)
        data = read_export(export_dir, need_preference=args.dpo)
        data.filters = filters
    check_enough(len(data.sft_train), minimum=args.min_rows, data_dir=str(data_dir))

    base = resolve_base(args.base, data_dir)
    fp = fingerprint(hyper, data.hash, base.sha256)
    check_resumable(run_dir, fp, hyper, "require" if args.resume else "auto")  # before the slow load
    if args.threads:
        import torch

        torch.set_num_threads(max(1, args.threads))
    device, dtype = pick_device(args.device)
    grad_ckpt = args.gradient_checkpointing if args.gradient_checkpointing is not None else device == "cuda"
    log(f"Base {base.label} ({base.architecture}, sha256 {base.sha256[:12]}...), training on {device} in "
        f"{str(dtype).removeprefix('torch.')}.")
    model, tok, load_s, from_cache = load_base(base, data_dir, dtype=dtype, use_cache=not args.no_base_cache,
                                               cache_root=args.base_cache, quiet=args.quiet, log=log)
    prepared = prepare_rows(tok, data.sft_train, max_length=hyper.max_length, fix_weight=hyper.fix_weight,
                            failed_weight=hyper.failed_weight)
    check_enough(len(prepared.rows), minimum=args.min_rows, data_dir=str(data_dir), too_long=prepared.too_long,
                 max_length=hyper.max_length)
    test = prepare_rows(tok, data.sft_test, max_length=hyper.max_length, fix_weight=hyper.fix_weight,
                        failed_weight=hyper.failed_weight)
    log(f"{len(prepared.rows)} training rows ({prepared.kinds['fix']} end in a fix after feedback, "
        f"{prepared.kinds['first']} passed at once; {prepared.too_long} longer than --max-length left out), "
        f"{len(test.rows)} held-out rows, {prepared.tokens} tokens.")

    model.to(device)
    model = add_lora(model, hyper, gradient_checkpointing=grad_ckpt)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    spec = RunSpec(run_dir=run_dir, fingerprint=fp, device=device,
                   dtype=dtype, pad_id=pad_id, resume="require" if args.resume else "auto",
                   save_every=args.save_every, progress=not args.quiet, log=log, eval_rows=max(1, args.eval_rows))
    figures = train_sft(model, prepared.rows, test.rows, hyper, spec)
    log(f"SFT: {figures['steps']} steps in {figures['train_s']:.0f} s ({figures['tokens_per_s']} tokens/s); weighted "
        f"loss on training rows {figures['train_loss_before']} -> {figures['train_loss_after']}"
        + (f", held out {figures['test_loss_before']} -> {figures['test_loss_after']}" if test.rows else "") + ".")
    method = "sft"
    if args.dpo:
        from .dpo import train_dpo

        figures["dpo"] = train_dpo(model, tok, data.pref_train, hyper, spec, grad_ckpt=grad_ckpt)
        method = "sft+dpo"

    # The adapter: PEFT files in the run folder, then the GGUF, checked in llama.cpp, then the row.
    model.save_pretrained(run_dir / "peft", selected_adapters=["default"], save_embedding_layers=False)
    state = get_peft_model_state_dict(model, adapter_name="default", save_embedding_layers=False)
    config = model.get_base_model().config.to_dict()
    del model
    gc.collect()
    record = {
        "name": name, "file_name": f"{name}.gguf", "base_model": base.name or base.path.stem,
        "base_file": base.path.name, "base_sha256": base.sha256, "architecture": base.architecture,
        "method": method, "source": "trained",
        "export": {**data.summary(), "used_rows": len(prepared.rows), "too_long": prepared.too_long,
                   "fix_rows": prepared.kinds["fix"], "first_rows": prepared.kinds["first"],
                   "test_rows_used": len(test.rows), **({"train_tasks": tasks} if tasks is not None else {})},
        "hyperparameters": {**asdict(hyper), "adapter_dtype": args.adapter_dtype,
                            "gradient_checkpointing": grad_ckpt},
        "training": {"device": device, "dtype": str(dtype).removeprefix("torch."), "load_s": round(load_s, 2),
                     "base_from_cache": from_cache, **{k: v for k, v in figures.items() if k != "losses"},
                     **versions, "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds")},
    }
    folder = adapters.adapters_dir(store)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / record["file_name"]
    tmp = folder / f".{name}.gguf.tmp"
    try:
        conv = convert(state, arch=base.architecture, config=config, alpha=hyper.lora_alpha, out=tmp, name=name,
                       dtype=args.adapter_dtype, strings=record_strings(record, adapters.card(record)))
        record["training"]["convert_s"] = conv["convert_s"]
        if not args.no_verify:
            record["training"]["verify_s"] = round(verify_loads(base.path, tmp), 2)
        from local_model.gguf import sha256_file

        record.update(sha256=sha256_file(tmp), size_bytes=tmp.stat().st_size)
        os.replace(tmp, final)
        try:
            rec = adapters.register(store, record, replace=args.replace)
        except BaseException:
            final.unlink(missing_ok=True)
            raise
    finally:
        tmp.unlink(missing_ok=True)
    (run_dir / "run.json").write_text(json.dumps({**record, "losses": figures.get("losses")}, indent=1, default=str))
    shutil.rmtree(run_dir / "checkpoint", ignore_errors=True)  # done: a new run of this name starts afresh
    for leftover in ("dpo", "sft-adapter"):
        shutil.rmtree(run_dir / leftover, ignore_errors=True)

    print(f"Adapter {name!r} registered: {rec['path']} ({rec['size_bytes'] / 2**20:.1f} MB, {method}, "
          f"{figures['steps']} steps, {time.perf_counter() - t_start:.0f} s in all).")
    print(f"Base: {base.path.name} (sha256 {base.sha256[:12]}...); it loads only onto that file.")
    print(f"Weighted loss: training rows {figures['train_loss_before']} -> {figures['train_loss_after']}"
          + (f"; held-out rows {figures['test_loss_before']} -> {figures['test_loss_after']}" if test.rows else "")
          + ".")
    kept_line = kept_epoch_line(figures)
    if kept_line:
        print(kept_line)
    warning = overfit_warning(figures, len(prepared.rows))
    if warning:
        print(warning)
    print(f"Next: evaluate base and adapter on held-out problems: python -m execfeedback eval HELD_OUT.jsonl "
          f"--data-dir {data_dir} --model {base.name or base.path} --adapter {name}")
    return 0


def _loss(x: float | None) -> str:
    return "?" if x is None else f"{x:.3g}"


def kept_epoch_line(figures: dict) -> str | None:
    """Which epoch's weights the adapter holds, beside the held-out loss before training and after each epoch."""
    measured, kept = figures.get("epoch_test_losses") or [], figures.get("kept_epoch")
    if not measured or kept is None:
        return None
    trail = " -> ".join(_loss(x) for x in [figures.get("test_loss_before"), *measured])
    cut = " (the last one cut short by --max-steps)" if figures.get("epochs_done") not in (None, len(measured)) else ""
    how = "--keep last" if figures.get("keep") == "last" else "the lowest held-out loss"
    best = figures.get("best_epoch")
    other = f"; epoch {best} had the lowest" if best is not None and best != kept else ""
    return f"Kept epoch {kept} of {len(measured)}{cut}, by {how} (held-out loss {trail}{other})."


def overfit_warning(figures: dict, n_rows: int) -> str | None:
    """A plain warning when training did not lower the held-out loss: the adapter learnt its rows, not the skill.

    Measured on an H100 with the coder model: 34 rows, 3 epochs, held-out loss 0.196 -> 0.225, and
    the adapter then lost 10 points of pass@1 on held-out problems.
    """
    before, after = figures.get("test_loss_before"), figures.get("test_loss_after")
    advice = ("Collect more solved traces (hundreds of rows), or train fewer epochs, and compare with `eval --adapter` "
              "before using it.")
    if figures.get("no_held_out_gain"):
        measured = [x for x in figures.get("epoch_test_losses") or [] if x is not None]
        return (f"Warning: the held-out loss never went below the base's ({before}; the best epoch reached "
                f"{min(measured)}). Epoch {figures.get('kept_epoch')} was kept ({after}), but the adapter fits its "
                f"{n_rows} training rows, not new tasks, and may do worse than the base. " + advice)
    if before is None or after is None or after <= before:
        return None
    best = figures.get("best_epoch")
    hint = (f" Epoch {best} did better; --keep best (the default) keeps it."
            if best is not None and best != figures.get("kept_epoch") else "")
    return (f"Warning: the held-out loss rose ({before} -> {after}): the adapter fits its {n_rows} training rows "
            "but not new tasks, and may do worse than the base." + hint + " " + advice)


def main(argv: list[str] | None = None) -> int:
    """Fine-tune from any process: the run gets a process of its own (see training_process)."""
    return run_own_process("finetune", list(sys.argv[1:] if argv is None else argv))
