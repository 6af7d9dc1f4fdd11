"""The LoRA training loop: weighted SFT on assistant turns, checkpoints, resume, progress, clean stops.

A plain torch loop rather than transformers' Trainer, because the loss weighs each assistant turn
(see data.py), only the assistant positions go through the LM head (`logits_to_keep`: the
logits of a long feedback context never exist), and a stop must land on a whole step that resumes
exactly. Row order is fixed by the seed and the effective batch (batch size x accumulation), so a
run resumed with `--batch-size 2 --grad-accum 2` after running out of memory at `--batch-size 4`
continues the same optimisation.

With held-out rows, the loss on them is measured at the end of every epoch and the epoch with the
lowest one is kept (`keep="best"`): on a few dozen rows the last epoch is often overfit (measured on
an H100 with the 1.5B coder model, 34 rows, 3 epochs: held-out loss 0.196 -> 0.225 and 10 points of
held-out pass@1 lost).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from .data import Encoded, FinetuneError, FinetuneInterrupted, is_oom

CHECKPOINT = "checkpoint"
BEST = "best.safetensors"
KEEP = ("best", "last")


@dataclass
class Hyper:
    epochs: int = 2
    max_steps: int | None = None
    lr: float = 2e-4
    batch_size: int = 4
    grad_accum: int = 1
    max_length: int = 2048
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: str = "all-linear"
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    fix_weight: float = 2.0
    failed_weight: float = 0.0
    seed: int = 0
    dpo: bool = False
    dpo_beta: float = 0.1
    dpo_lr: float = 2e-5
    dpo_epochs: int = 1
    dpo_max_steps: int | None = None
    keep: str = "best"  # best: the epoch with the lowest held-out loss; last: the final weights

    @property
    def effective_batch(self) -> int:
        return self.batch_size * self.grad_accum

    def validate(self) -> "Hyper":
        checks = [(self.epochs >= 1, "--epochs must be at least 1"),
                  (self.max_steps is None or self.max_steps >= 1, "--max-steps must be at least 1"),
                  (self.lr > 0, "--lr must be positive"), (self.batch_size >= 1, "--batch-size must be at least 1"),
                  (self.grad_accum >= 1, "--grad-accum must be at least 1"),
                  (self.max_length >= 32, "--max-length must be at least 32"),
                  (self.lora_r >= 1, "--lora-r must be at least 1"), (self.lora_alpha > 0, "--lora-alpha must be positive"),
                  (0 <= self.lora_dropout < 1, "--lora-dropout must be in [0, 1)"),
                  (self.fix_weight > 0, "--fix-weight must be positive"),
                  (self.failed_weight >= 0, "--failed-weight must be 0 or more"),
                  (self.dpo_beta > 0, "--dpo-beta must be positive"),
                  (self.keep in KEEP, "--keep must be best or last")]
        for ok, message in checks:
            if not ok:
                raise FinetuneError(message)
        return self

    def resume_key(self) -> dict:
        """What a checkpoint must agree on to be resumed (the micro-batch split may change)."""
        d = asdict(self)
        for k in ("batch_size", "grad_accum", "dpo", "dpo_beta", "dpo_lr", "dpo_epochs", "dpo_max_steps",
                  "keep"):  # keep chooses among the same epochs: a rerun may change it
            d.pop(k)
        d["effective_batch"] = self.effective_batch
        return d


def fingerprint(hyper: Hyper, data_hash: str, base_sha256: str) -> str:
    blob = json.dumps({"hyper": hyper.resume_key(), "data": data_hash, "base": base_sha256}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def pick_device(requested: str = "auto"):
    """(device, dtype): the GPU in bf16 when there is one (fp32 when it lacks bf16), else the CPU in fp32."""
    import torch

    if requested not in ("auto", "cpu", "cuda"):
        raise FinetuneError("--device must be auto, cpu or cuda")
    if requested == "cuda" and not torch.cuda.is_available():
        raise FinetuneError("--device cuda: torch sees no CUDA GPU (is the CUDA build of torch installed?). Use "
                            "--device cpu, or leave --device out.")
    if requested != "cpu" and torch.cuda.is_available():
        return "cuda", torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return "cpu", torch.float32


def add_lora(model, hyper: Hyper, *, gradient_checkpointing: bool):
    import warnings

    import torch
    from peft import LoraConfig, get_peft_model

    if gradient_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    cfg = LoraConfig(r=hyper.lora_r, lora_alpha=hyper.lora_alpha, lora_dropout=hyper.lora_dropout,
                     target_modules=hyper.target_modules, bias="none", task_type="CAUSAL_LM")
    torch.manual_seed(hyper.seed)  # the LoRA A matrices start random: --seed makes a run repeatable
    with warnings.catch_warnings():  # peft asks transformers a deprecated question; nothing for the user to do
        warnings.simplefilter("ignore", FutureWarning)
        return get_peft_model(model, cfg)


# -- batches and the loss ------------------------------------------------------------------------------

def _collate(rows: list[Encoded], pad_id: int, device):
    import torch

    n = max(len(r.input_ids) for r in rows)
    ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    w = torch.zeros((len(rows), n), dtype=torch.float32)
    for i, r in enumerate(rows):
        k = len(r.input_ids)
        ids[i, :k] = torch.tensor(r.input_ids)
        mask[i, :k] = 1
        w[i, :k] = torch.tensor(r.weights)
    return ids.to(device), mask.to(device), w.to(device)


def _parts(model):
    """(backbone, LM head, final logit softcap) of a causal LM, through a PEFT wrapper."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    return lm.get_decoder(), lm.get_output_embeddings(), getattr(lm.config, "final_logit_softcapping", None)


def weighted_loss_sum(model, rows: list[Encoded], pad_id: int, device, autocast) -> tuple[Any, float, int]:
    """(sum of weight x token loss, sum of weights, tokens) for one micro-batch.

    Only the hidden states of trained positions go through the LM head, so the logits of the
    prompt and of the execution feedback (most of a row) are never materialised.
    """
    import torch
    import torch.nn.functional as F

    ids, mask, w = _collate(rows, pad_id, device)
    backbone, head, softcap = _parts(model)
    tw = w[:, 1:]
    sel = tw > 0
    with autocast():
        hidden = backbone(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        logits = head(hidden[:, :-1][sel]).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    losses = F.cross_entropy(logits, ids[:, 1:][sel], reduction="none")
    return (losses * tw[sel]).sum(), float(tw[sel].sum()), int(mask.sum())


def mean_loss(model, rows: list[Encoded], *, pad_id: int, device, autocast, batch_size: int) -> float | None:
    """The weighted loss over rows (no gradients): the figure compared before and after training."""
    import torch

    if not rows:
        return None
    was_training = model.training
    model.eval()
    total, weight = 0.0, 0.0
    try:
        with torch.no_grad():
            for i in range(0, len(rows), batch_size):
                s, wsum, _ = weighted_loss_sum(model, rows[i:i + batch_size], pad_id, device, autocast)
                total += float(s)
                weight += wsum
    finally:
        model.train(was_training)
    return round(total / weight, 5) if weight else None


# -- checkpoints ------------------------------------------------------------------------------------------

def _rng_state() -> dict:
    import torch

    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    import torch

    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _lora_weights(model) -> dict:
    from peft import get_peft_model_state_dict

    return {k: v.detach().contiguous().cpu()
            for k, v in get_peft_model_state_dict(model, save_embedding_layers=False).items()}


def save_checkpoint(run_dir: Path, model, opt, sched, state: dict) -> Path:
    """Write the checkpoint beside the old one, then swap: a kill mid-save leaves the old one whole."""
    import torch
    from safetensors.torch import save_file

    final = run_dir / CHECKPOINT
    tmp = run_dir / f"{CHECKPOINT}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(_lora_weights(model), tmp / "adapter.safetensors")
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": _rng_state()},
               tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    old = run_dir / f"{CHECKPOINT}.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def read_checkpoint_state(run_dir: Path) -> dict | None:
    p = run_dir / CHECKPOINT / "state.json"
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except ValueError:
        return None


def check_resumable(run_dir: Path, fp: str, hyper: Hyper, resume: str = "auto") -> dict | None:
    """The checkpoint's state when this run may resume it, None when there is none; else a FinetuneError."""
    state = read_checkpoint_state(run_dir) if resume != "restart" else None
    if state is None and resume == "require":
        raise FinetuneError(f"--resume: there is no checkpoint in {run_dir}. Leave --resume out to start a new run.")
    if state is not None and state.get("fingerprint") != fp:
        theirs, ours = state.get("hyper") or {}, hyper.resume_key()
        diff = ", ".join(f"{k} {theirs.get(k)!r} then, {ours.get(k)!r} now" for k in ours if theirs.get(k) != ours.get(k))
        raise FinetuneError(
            f"The checkpoint in {run_dir / CHECKPOINT} was made with other data, hyperparameters or base model"
            + (f" ({diff})" if diff else " (the training rows or the base file differ)")
            + ". Run the same command as before to resume it (the batch size may change if --batch-size x "
            "--grad-accum stays the same), or pass --restart to start over.")
    return state


def _load_checkpoint(run_dir: Path, model, opt, sched) -> None:
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    ck = run_dir / CHECKPOINT
    set_peft_model_state_dict(model, load_file(ck / "adapter.safetensors"))
    blob = torch.load(ck / "optimizer.pt", weights_only=False)
    opt.load_state_dict(blob["optimizer"])
    sched.load_state_dict(blob["scheduler"])
    _set_rng_state(blob["rng"])


# -- the best epoch -------------------------------------------------------------------------------------

def save_best(run_dir: Path, model, *, epoch: int, step: int, test_loss: float) -> Path:
    """Write the LoRA weights of the best epoch so far (beside the old file, then swap), labelled with it."""
    from safetensors.torch import save_file

    final, tmp = run_dir / BEST, run_dir / f"{BEST}.tmp"
    save_file(_lora_weights(model), tmp,
              metadata={"epoch": str(epoch), "step": str(step), "test_loss": repr(test_loss)})
    os.replace(tmp, final)
    return final


def read_best_label(run_dir: Path) -> dict | None:
    """{epoch, step, test_loss} of the weights in best.safetensors; None when it is missing or unreadable."""
    from safetensors import SafetensorError, safe_open

    path = run_dir / BEST
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        return {"epoch": int(meta["epoch"]), "step": int(meta["step"]), "test_loss": float(meta["test_loss"])}
    except (OSError, ValueError, KeyError, SafetensorError):
        return None


def _adopt_newer_best(run_dir: Path, state: dict) -> None:
    """A stop between writing best.safetensors and the next checkpoint leaves the file ahead of the state.

    The file only ever holds a new lowest held-out loss, so the state takes its label; the replayed
    epoch then replaces it only if it does better still.
    """
    label = read_best_label(run_dir)
    if label and label["step"] > state["step"]:
        state.update(best_epoch=label["epoch"], best_step=label["step"], best_test_loss=label["test_loss"])


def _load_best(run_dir: Path, model, state: dict) -> bool:
    """Put the best epoch's weights back into the model; False (model untouched) when the file does not match."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    label = read_best_label(run_dir)
    if not label or label["step"] != state.get("best_step"):
        return False
    set_peft_model_state_dict(model, load_file(run_dir / BEST))
    return True


# -- stopping cleanly -----------------------------------------------------------------------------------

class StopFlag:
    """First Ctrl-C (or SIGTERM): finish the step, save, stop. A second one stops at once."""

    def __init__(self):
        self.requested = False
        self._old: dict = {}

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nStopping after this step and saving a checkpoint (press Ctrl-C again to stop at once)...",
              file=sys.stderr, flush=True)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


# -- the loop -------------------------------------------------------------------------------------------

@dataclass
class RunSpec:
    run_dir: Path
    fingerprint: str
    device: str
    dtype: Any
    pad_id: int
    resume: str = "auto"  # auto | require | restart
    save_every: int = 20
    progress: bool = True
    log: Callable[[str], None] = print
    eval_rows: int = 64
    extra_state: dict = field(default_factory=dict)


def _order(n: int, seed: int, epoch: int) -> list[int]:
    rng = random.Random(f"{seed}:{epoch}")
    idx = list(range(n))
    rng.shuffle(idx)
    return idx


def train_sft(model, rows: list[Encoded], test_rows: list[Encoded], hyper: Hyper, spec: RunSpec) -> dict:
    """Run (or resume) the SFT loop; returns the figures of the run. Raises FinetuneInterrupted on a stop."""
    import torch
    from tqdm import tqdm
    from transformers import get_cosine_schedule_with_warmup

    device = spec.device
    autocast = ((lambda: torch.autocast("cuda", dtype=spec.dtype)) if device == "cuda" and spec.dtype != torch.float32
                else contextlib.nullcontext)
    n = len(rows)
    eff = hyper.effective_batch
    steps_per_epoch = math.ceil(n / eff)
    total = hyper.max_steps or steps_per_epoch * hyper.epochs
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=hyper.lr, weight_decay=hyper.weight_decay)
    sched = get_cosine_schedule_with_warmup(opt, math.ceil(total * hyper.warmup_ratio), total)
    run_dir = spec.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)

    if spec.resume == "restart":
        shutil.rmtree(run_dir / CHECKPOINT, ignore_errors=True)
    state = check_resumable(run_dir, spec.fingerprint, hyper, spec.resume)
    if state is not None:
        _load_checkpoint(run_dir, model, opt, sched)
        state.setdefault("epoch_test_losses", [])  # a checkpoint from before epochs were measured
        _adopt_newer_best(run_dir, state)
        spec.log(f"Resuming from the checkpoint at step {state['step']} of {total} in {run_dir / CHECKPOINT}.")
    else:
        (run_dir / BEST).unlink(missing_ok=True)  # an earlier run's best epoch is not this run's
        torch.manual_seed(hyper.seed)
        random.seed(hyper.seed)
        sample = [rows[i] for i in _order(n, hyper.seed, -1)[: spec.eval_rows]]
        state = {"fingerprint": spec.fingerprint, "hyper": hyper.resume_key(), "step": 0, "total": total,
                 "losses": [], "tokens": 0, "train_s": 0.0, "epoch_test_losses": [], "best_epoch": None,
                 "best_step": None, "best_test_loss": None, **spec.extra_state,
                 "train_loss_before": mean_loss(model, sample, pad_id=spec.pad_id, device=device, autocast=autocast,
                                                batch_size=hyper.batch_size),
                 "test_loss_before": mean_loss(model, test_rows[:128], pad_id=spec.pad_id, device=device,
                                               autocast=autocast, batch_size=hyper.batch_size)}
    state["total"] = total
    held_out = test_rows[:128]

    def end_of_epoch() -> None:
        """Measure the held-out loss; keep the weights when no trained epoch so far did better."""
        epoch = math.ceil(state["step"] / steps_per_epoch)  # the last one may be cut short by --max-steps
        loss = mean_loss(model, held_out, pad_id=spec.pad_id, device=device, autocast=autocast,
                         batch_size=hyper.batch_size)
        measured = state["epoch_test_losses"]
        del measured[epoch - 1:]
        measured.extend([None] * (epoch - 1 - len(measured)) + [loss])
        best = state.get("best_test_loss")
        if loss is not None and (best is None or loss < best):
            save_best(run_dir, model, epoch=epoch, step=state["step"], test_loss=loss)
            state.update(best_epoch=epoch, best_step=state["step"], best_test_loss=loss)

    model.train()
    start = state["step"]
    bar = tqdm(total=total, initial=start, unit="step", desc="sft", disable=not spec.progress, file=sys.stderr,
               dynamic_ncols=True, mininterval=0.5)
    stop = StopFlag()
    last_saved = start
    try:
        with stop:
            for step in range(start, total):
                epoch, k = divmod(step, steps_per_epoch)
                chosen = [rows[i] for i in _order(n, hyper.seed, epoch)[k * eff:(k + 1) * eff]]
                t0 = time.perf_counter()
                try:
                    weight = sum(sum(r.weights[1:]) for r in chosen)
                    step_loss, tokens = 0.0, 0
                    for i in range(0, len(chosen), hyper.batch_size):
                        s, _, tok = weighted_loss_sum(model, chosen[i:i + hyper.batch_size], spec.pad_id, device,
                                                      autocast)
                        (s / weight).backward()
                        step_loss += float(s.detach()) / weight
                        tokens += tok
                    torch.nn.utils.clip_grad_norm_(params, hyper.max_grad_norm)
                    opt.step()
                    sched.step()
                    opt.zero_grad(set_to_none=True)
                except (RuntimeError, MemoryError) as e:
                    if not is_oom(e):
                        raise
                    opt.zero_grad(set_to_none=True)
                    _free(device)
                    save_checkpoint(run_dir, model, opt, sched, state)
                    raise FinetuneError(_oom_message(hyper, step, device, spec)) from None
                dt = time.perf_counter() - t0
                state["step"] = step + 1
                state["losses"].append(round(step_loss, 5))
                state["tokens"] += tokens
                state["train_s"] = round(state["train_s"] + dt, 3)
                bar.update(1)
                bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{tokens / dt:.0f}" if dt else "-", refresh=False)
                epoch_done = bool(held_out) and (state["step"] % steps_per_epoch == 0 or state["step"] == total)
                if epoch_done:  # before a stop: a resumed run starts after this step and would skip it
                    end_of_epoch()
                if stop.requested:
                    break
                due = epoch_done or (spec.save_every and state["step"] % spec.save_every == 0)
                if due and state["step"] < total:
                    save_checkpoint(run_dir, model, opt, sched, state)
                    last_saved = state["step"]
    except KeyboardInterrupt:
        bar.close()
        raise FinetuneInterrupted(
            f"Stopped at once; the last checkpoint (step {last_saved} of {total}) is kept in {run_dir / CHECKPOINT}. "
            "Run the same command again to resume from it.") from None
    bar.close()
    if state["step"] < total:
        save_checkpoint(run_dir, model, opt, sched, state)
        raise FinetuneInterrupted(f"Stopped at step {state['step']} of {total}; the checkpoint is in "
                                  f"{run_dir / CHECKPOINT}. Run the same command again to resume (nothing was "
                                  "registered yet).")
    # The checkpoint holds the last weights: a crash in conversion must not cost the training, and a
    # rerun may still choose --keep last.
    save_checkpoint(run_dir, model, opt, sched, state)
    measured = state["epoch_test_losses"] if held_out else []
    kept = len(measured) or None
    if measured and hyper.keep == "best" and state.get("best_epoch") not in (None, kept):
        if _load_best(run_dir, model, state):
            kept = state["best_epoch"]
        else:
            spec.log(f"{run_dir / BEST} is missing or does not hold epoch {state['best_epoch']}; keeping the last "
                     "weights.")
    sample = [rows[i] for i in _order(n, hyper.seed, -1)[: spec.eval_rows]]
    state["train_loss_after"] = mean_loss(model, sample, pad_id=spec.pad_id, device=device, autocast=autocast,
                                          batch_size=hyper.batch_size)
    state["test_loss_after"] = mean_loss(model, held_out, pad_id=spec.pad_id, device=device, autocast=autocast,
                                         batch_size=hyper.batch_size)
    trained = [x for x in measured if x is not None]
    before = state.get("test_loss_before")
    losses = state["losses"]
    head = losses[: max(1, min(5, len(losses) // 4))]
    tail = losses[-max(1, min(5, len(losses) // 4)):]
    return {
        "steps": total, "steps_per_epoch": steps_per_epoch, "epochs_done": round(total / steps_per_epoch, 2),
        "train_rows": n, "test_rows": len(test_rows), "train_tokens": state["tokens"], "train_s": state["train_s"],
        "steps_per_s": round(total / state["train_s"], 4) if state["train_s"] else None,
        "tokens_per_s": round(state["tokens"] / state["train_s"], 1) if state["train_s"] else None,
        "loss_first": round(sum(head) / len(head), 5), "loss_last": round(sum(tail) / len(tail), 5),
        "losses": losses, "resumed_at": start or None,
        **{k: state.get(k) for k in ("train_loss_before", "train_loss_after", "test_loss_before", "test_loss_after")},
        "keep": hyper.keep, "epoch_test_losses": measured, "best_epoch": state.get("best_epoch") if measured else None,
        "kept_epoch": kept,
        # The base itself cannot be kept, so the best trained epoch is; this flag says it did not beat the base.
        "no_held_out_gain": (min(trained) >= before) if trained and before is not None else None,
    }


def _free(device: str) -> None:
    import gc

    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def _oom_message(hyper: Hyper, step: int, device: str, spec: RunSpec) -> str:
    where = "GPU" if device == "cuda" else "RAM"
    tips = []
    if hyper.batch_size > 1:
        b = max(1, hyper.batch_size // 2)
        tips.append(f"--batch-size {b} --grad-accum {hyper.effective_batch // b} (same effective batch: the run "
                    "resumes where it stopped)")
    tips.append(f"--max-length {max(256, hyper.max_length // 2)} (longer rows are left out; starts over with "
                "--restart)")
    if device == "cuda":
        tips.append("--gradient-checkpointing (less memory, about 30% slower)")
    tips.append(f"a smaller --lora-r than {hyper.lora_r}")
    return (f"Out of {where} at step {step + 1} (batch size {hyper.batch_size}, max length {hyper.max_length}). "
            f"The checkpoint is in {spec.run_dir / CHECKPOINT}. Try " + "; or ".join(tips) + ".")
