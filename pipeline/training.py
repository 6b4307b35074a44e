"""What every Trainer-based stage shares: config defaults, resume, divergence guard, saving."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from pipeline.modeling import use_bf16
from pipeline.recipe import import_object


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


def make_config(dotted: str, args: dict[str, Any], *, output_dir: str, seed: int):
    """Build a TRL/transformers config: hardware-appropriate defaults, then the recipe's `args`.

    TRL defaults to bf16 (fails or crawls on CPU) and gradient checkpointing (slower on small
    models); both are chosen here from the hardware unless the recipe sets them.
    """
    args = dict(args)
    if "gradient_checkpointing" in args:  # deprecated alias in transformers 5
        args.setdefault("activation_checkpointing", args.pop("gradient_checkpointing"))
    defaults: dict[str, Any] = dict(
        bf16=use_bf16(), fp16=False, activation_checkpointing=False, report_to="none",
        logging_steps=10, logging_first_step=True, save_steps=50, save_total_limit=2,
        seed=seed, data_seed=seed, eval_strategy="no",
    )
    cls = import_object(dotted)
    fields = {f.name for f in dataclasses.fields(cls)}
    defaults = {k: v for k, v in defaults.items() if k in fields}  # e.g. PPOConfig has no eval_strategy
    return cls(output_dir=output_dir, **{**defaults, **args})


class DivergenceGuard(TrainerCallback):
    """Stop with a clear error the moment a logged loss is NaN or infinite."""

    def __init__(self, stage: str):
        self.stage = stage

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key, value in (logs or {}).items():
            if "loss" in key and isinstance(value, float) and not math.isfinite(value):
                raise TrainingDiverged(f"stage '{self.stage}': {key} became {value} at step {state.global_step}; "
                                       "lower the learning rate or check the data")


def last_checkpoint(checkpoint_dir: Path) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(checkpoint_dir)) if checkpoint_dir.is_dir() else None


TIMING_KEYS = ("runtime", "per_second", "total_flos", "_time")


def numeric(metrics: dict[str, Any]) -> dict[str, float]:
    """Numbers only, timings left out: timings go to the manifest, metrics must reproduce exactly."""
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not any(t in k for t in TIMING_KEYS)}


def train(trainer, checkpoint_dir: Path, stage_dir: Path) -> dict[str, float]:
    """Train (resuming from the newest checkpoint if one exists), evaluate, keep the log history."""
    resume = last_checkpoint(checkpoint_dir)
    if resume:
        print(f"resuming from {resume}", flush=True)
    result = trainer.train(resume_from_checkpoint=resume)
    metrics = {f"train_{k}" if not k.startswith("train") else k: v for k, v in result.metrics.items()}
    metrics.update(trainer.evaluate() if trainer.eval_dataset is not None else {})
    if trainer.is_world_process_zero():
        history = trainer.state.log_history
        (stage_dir / "log_history.json").write_text(json.dumps(history, indent=1))
    return numeric(metrics)


def save(trainer, tokenizer, spec, ctx, *, task: str = "causal-lm", merge_default: bool = False) -> None:
    """Write the trained model (or adapter, or adapter merged into its base) and tokenizer to the stage output."""
    import shutil

    from pipeline.modeling import save_merged

    peft = getattr(spec, "peft", None)
    merge = peft is not None and bool(peft.get("merge", merge_default))
    target = ctx.stage_dir / "adapter.partial" if merge else ctx.output_dir
    trainer.save_model(str(target))  # gathers ZeRO-3/FSDP shards; main process writes
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(target)
        if merge:
            save_merged(target, ctx.output_dir, trust_remote_code=spec.trust_remote_code, task=task)
            shutil.rmtree(target)
