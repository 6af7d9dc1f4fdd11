"""DPO on the preference pairs (TRL), after SFT, with the SFT adapter as the reference model.

The pairs are the export's: the round-0 prompt, chosen = the code that finally passed, rejected =
a failing answer of the same trace. Given a PEFT model, TRL copies its adapter into a frozen one
named "ref" and uses that as the reference, so DPO moves the policy away from the SFT model, not
from the bare base. Checkpoints go to <run>/dpo/ and a stopped run resumes there (the SFT
checkpoint restores the reference first).
"""

from __future__ import annotations

import sys
import time
import warnings
from .data import FinetuneError, FinetuneInterrupted, is_oom
from .train import Hyper, RunSpec, StopFlag

REF = "ref"


def _checkpointing(config_class, on: bool) -> dict:
    """Recent transformers 5 renamed gradient_checkpointing to activation_checkpointing."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(config_class)}
    key = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    return {key: on, f"{key}_kwargs": {"use_reentrant": False} if on else None}


def train_dpo(model, tokenizer, pairs: list[dict], hyper: Hyper, spec: RunSpec, *, grad_ckpt: bool) -> dict:
    import torch
    from datasets import Dataset
    from tqdm import tqdm
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from transformers.trainer_utils import get_last_checkpoint
    from trl import DPOConfig, DPOTrainer

    if not pairs:
        raise FinetuneError("--dpo: the export has no preference pairs (they need solved traces with a failed "
                            "attempt). Leave --dpo out, or collect traces that were fixed after feedback.")
    out = spec.run_dir / "dpo"
    model.set_adapter("default")
    rows = [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in pairs]
    cfg = DPOConfig(
        output_dir=str(out), per_device_train_batch_size=hyper.batch_size,
        gradient_accumulation_steps=hyper.grad_accum, learning_rate=hyper.dpo_lr,
        num_train_epochs=hyper.dpo_epochs, max_steps=hyper.dpo_max_steps or -1, beta=hyper.dpo_beta,
        max_length=hyper.max_length, save_strategy="steps", save_steps=max(1, spec.save_every), save_total_limit=1,
        logging_steps=1, report_to=[], disable_tqdm=True, seed=hyper.seed, use_cpu=spec.device == "cpu",
        bf16=spec.device == "cuda" and spec.dtype == torch.bfloat16, dataloader_num_workers=0,
        remove_unused_columns=False, **_checkpointing(DPOConfig, grad_ckpt))
    stop = StopFlag()
    figures: dict = {"losses": [], "rewards_accuracy": []}

    class Progress(TrainerCallback):
        bar = None

        def on_train_begin(self, args, state, control, **kw):
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, unit="step", desc="dpo",
                            disable=not spec.progress, file=sys.stderr, dynamic_ncols=True)

        def on_log(self, args, state, control, logs=None, **kw):
            logs = logs or {}
            if "loss" in logs:
                figures["losses"].append(round(float(logs["loss"]), 5))
                acc = logs.get("rewards/accuracies")
                if acc is not None:
                    figures["rewards_accuracy"].append(round(float(acc), 4))
                if self.bar is not None:
                    self.bar.set_postfix(loss=f"{logs['loss']:.4f}", refresh=False)

        def on_step_end(self, args, state, control, **kw):
            if self.bar is not None:
                self.bar.update(state.global_step - self.bar.n)
            if stop.requested:
                control.should_save = True
                control.should_training_stop = True

        def on_train_end(self, args, state, control, **kw):
            if self.bar is not None:
                self.bar.close()
            figures["steps"] = state.global_step
            figures["max_steps"] = state.max_steps

    if not spec.progress:
        import datasets

        datasets.disable_progress_bars()
    trainer = DPOTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         callbacks=[Progress()])
    trainer.remove_callback(PrinterCallback)  # our bar shows the loss; no log dicts on stdout
    resume = get_last_checkpoint(str(out)) if out.is_dir() else None
    if resume:
        spec.log(f"Resuming DPO from {resume}.")
    t0 = time.perf_counter()
    try:
        with stop, warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            trainer.train(resume_from_checkpoint=resume)
    except KeyboardInterrupt:
        raise FinetuneInterrupted(f"DPO stopped at once; the last checkpoint in {out} is kept. Run the same command "
                                  "again to resume.") from None
    except (RuntimeError, MemoryError) as e:
        if not is_oom(e):
            raise
        raise FinetuneError(f"Out of memory during DPO (batch size {hyper.batch_size}, max length "
                            f"{hyper.max_length}; each step holds a chosen and a rejected sequence). Try --batch-size "
                            f"{max(1, hyper.batch_size // 2)} --grad-accum {hyper.grad_accum * 2}, or a smaller "
                            "--max-length.") from None
    if stop.requested and figures.get("steps", 0) < figures.get("max_steps", 0):
        raise FinetuneInterrupted(f"DPO stopped at step {figures.get('steps')} of {figures.get('max_steps')}; the "
                                  f"checkpoint is in {out}. Run the same command again to resume.")
    if REF in model.peft_config:
        model.delete_adapter(REF)
    model.set_adapter("default")
    figures["train_s"] = round(time.perf_counter() - t0, 2)
    figures["pairs"] = len(rows)
    return figures
