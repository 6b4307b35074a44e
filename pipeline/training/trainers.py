"""What every Trainer-based stage shares: config defaults, resume, divergence guard, saving."""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import importlib.util
import json
import logging
import math
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from datasets import Dataset
from transformers import TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from trl.trainer import utils as trl_utils

from pipeline.config.paths import import_object
from pipeline.models.loading import match_trainable_dtype, process_defaults, save_merged, use_bf16
from pipeline.runtime.memory import freed_memory_returned, huge_pages_on
from pipeline.runtime.process import UserError
from pipeline.runtime.progress import StageProgress, held_out_evaluation
from pipeline.training.health import HealthWatch


class TrainingDiverged(UserError, RuntimeError):
    """The loss became NaN or infinite."""


def gpu_fast_paths() -> dict[str, Any]:
    """Config fields for the fast paths this machine can take (on CPU none apply; see README, Performance).

    vLLM generation (GRPO, sharing the training GPU) needs a GPU and `vllm`, and is used where both are there.
    Liger's kernels are not turned on by themselves: TRL 1.16 deprecates `use_liger_kernel`, and with
    liger-kernel 0.8.5 the first forward pass fetched a rotary kernel from the Hub, which failed the stage on an
    offline H200 (2026-12-04); a recipe asks for them with `args: {use_liger_kernel: true}`. Fused AdamW needs
    nothing: it is transformers' default optimizer from torch 2.8, CPU included.
    """

    if not torch.cuda.is_available() or importlib.util.find_spec("vllm") is None:
        return {}
    return {"use_vllm": True, "vllm_mode": "colocate"}  # GRPOConfig fields; other configs lack them


# Vocabulary columns per tile of TRL's fused LM-head loss (its default: 32768). Off Triton devices the tiles are
# folded with torch ops, each making a few temporaries of tokens x columns floats: at 2 x 512 tokens, about
# 1 GB at the peak of a backward with 32768 columns, against 0.13 GB with 4096, which is also faster on CPU
# (one thread, 1022 tokens, forward and backward: 2.3 s against 2.8 s).
CPU_LOSS_TILE_COLUMNS = 4096


@contextlib.contextmanager
def loss_tiles_for(device) -> Iterator[None]:
    """TRL's fused LM-head loss in tiles of CPU_LOSS_TILE_COLUMNS vocabulary columns while training on `device`
    without Triton (CPU); on CUDA and XPU TRL's Triton kernels fold each tile in place, and its default stays.

    No config field sets the tile width, so this sets TRL's module constant for the stage and puts it back;
    a TRL without the constant is left as it is (and the saving with it)."""
    default = getattr(trl_utils, "_CHUNKED_LOGPROB_CHUNK_SIZE", None)
    if default is None or getattr(device, "type", str(device)) in ("cuda", "xpu"):
        yield
        return
    trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE = min(default, CPU_LOSS_TILE_COLUMNS)
    try:
        yield
    finally:
        trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE = default


def unused_parameters_possible(model) -> bool:
    """Whether a training step can leave trainable parameters without a gradient: mixture-of-experts layers
    skip the experts no token was routed to. Only then must DDP search the graph for them every step."""
    config = model.config.get_text_config()
    return any(getattr(config, key, None) for key in ("num_local_experts", "num_experts", "n_routed_experts"))


def make_config(dotted: str, args: dict[str, Any], *, output_dir: str, seed: int, model=None,
                eval_on_start: bool = False):
    """Build a TRL/transformers (or the PPO trainer's) config: `pipeline_defaults`, then the recipe's `args`."""
    args = dict(args)
    if "gradient_checkpointing" in args:  # deprecated alias in transformers 5
        args.setdefault("activation_checkpointing", args.pop("gradient_checkpointing"))
    cls = import_object(dotted)
    defaults = pipeline_defaults(cls, seed, model=model, eval_on_start=eval_on_start)
    return cls(output_dir=output_dir, **{**defaults, **args})


def pipeline_defaults(cls: type, seed: int, *, model=None, eval_on_start: bool = False) -> dict[str, Any]:
    """What the pipeline sets over the config class's own defaults, for the fields `cls` has.

    TRL defaults to bf16 (fails or crawls on CPU) and gradient checkpointing (slower on small
    models); both are chosen here from the hardware unless the recipe sets them, as are `use_cpu`
    and `ddp_backend`, without which a CPU-only `accelerate launch` trains each process alone, and
    the GPU fast paths (`gpu_fast_paths`). `eval_on_start` measures the starting model on the held-out split
    (for `train`'s `initial` metrics). Given the `model`, DDP looks for unused parameters only
    where there can be some (transformers' default searches every step, and warns that it found none).
    Logging and checkpoint intervals are sized for Trainer steps, so only Trainer configs get them.
    """
    defaults: dict[str, Any] = dict(bf16=use_bf16(), report_to="none", seed=seed)
    if issubclass(cls, TrainingArguments):
        defaults |= dict(
            fp16=False, activation_checkpointing=False, logging_steps=10, logging_first_step=True, save_steps=50,
            save_total_limit=2,
            logging_nan_inf_filter=False,  # the default logs a NaN loss as the window's mean: DivergenceGuard would miss it
            data_seed=seed, eval_strategy="no", eval_on_start=eval_on_start, **process_defaults(), **gpu_fast_paths())
        if model is not None:
            defaults["ddp_find_unused_parameters"] = unused_parameters_possible(model)
    fields = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in defaults.items() if k in fields}


def evaluated(held_out: Dataset) -> Dataset | None:
    """The held-out rows a Trainer evaluates on, or None where the recipe turned that off (`eval_samples: 0`)."""
    return held_out if len(held_out) else None


def batch_by_length(trainer, length_of: Callable[[dict[str, Any]], int]) -> None:
    """Make `train_sampling_strategy: group_by_length` (or `batch_rebalance`) work on preference pairs.

    transformers' length samplers read the `length_column_name` column, or infer lengths from
    `input_ids`; TRL's tokenized pairs have neither, so training would stop at its first batch with a
    ValueError. The column is added from each tokenized pair (`length_of`), and column pruning turned
    off so the sampler still sees it (TRL's preference collators pick their own keys by name).

    Done to the Trainer after it is built, not to its config and data before: TRL tokenizes the pairs inside
    its constructor, and the lengths are those of its tokenized rows.
    """

    if trainer.args.train_sampling_strategy not in ("group_by_length", "batch_rebalance"):
        return
    trainer.args.remove_unused_columns = False
    column = trainer.args.length_column_name
    for split in ("train_dataset", "eval_dataset"):
        dataset = getattr(trainer, split)
        if isinstance(dataset, Dataset) and column not in dataset.column_names:  # streamed rows: no lengths up front
            setattr(trainer, split, dataset.add_column(column, [length_of(row) for row in dataset]))


class DivergenceGuard(TrainerCallback):
    """Stop with a clear error the moment a logged loss is NaN or infinite."""

    def __init__(self, stage: str):
        self.stage = stage

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key, value in (logs or {}).items():
            if "loss" in key and isinstance(value, float) and not math.isfinite(value):
                raise TrainingDiverged(f"stage '{self.stage}': {key} became {value} at step {state.global_step}; "
                                       "lower the learning rate or check the data")


def stage_callbacks(stage: str, health: HealthWatch) -> list[TrainerCallback]:
    """What every Trainer-based stage passes to its Trainer: NaN guard, logs that tile the run, progress lines,
    run-health findings as they show."""
    return [DivergenceGuard(stage), LogAtCheckpoints(), StageProgress(), HealthCallback(health)]


class HealthCallback(TrainerCallback):
    """Checks a Trainer's log history each time it logs (after the row is appended)."""

    def __init__(self, watch: HealthWatch):
        self.watch = watch

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.watch.during(state.log_history, state.global_step, state.max_steps)


class LogAtCheckpoints(TrainerCallback):
    """Also log at every checkpoint and at the last step, so the logged windows tile the run and end
    where checkpoints do: a resumed run's log, restored from its checkpoint, then holds every step's loss."""

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save or state.global_step >= state.max_steps:  # set by DefaultFlowCallback, called first
            control.should_log = True
        return control


def mean_train_loss(history: list[dict[str, Any]]) -> float | None:
    """Mean training loss over every step, from the logged window means (a window ends at its row's step).

    The Trainer's own `train_loss` covers only the steps of the last `train()` call, so after a
    resume it would differ from an uninterrupted run's.
    """
    total, previous = 0.0, 0
    for row in history:
        if "loss" in row and "step" in row:
            total += row["loss"] * (row["step"] - previous)
            previous = row["step"]
    return total / previous if previous else None


def last_checkpoint(checkpoint_dir: Path, resumable: Callable[[int], bool] = lambda step: True) -> str | None:
    """The newest complete Trainer checkpoint to resume from, or None.

    Passed over: a checkpoint a kill cut short (the Trainer writes its files in place,
    trainer_state.json last; transformers' get_last_checkpoint would pick it), the one taken
    at max_steps, from which transformers 5.23 trains one step past the end, and one at a step
    `resumable` refuses (`generation_boundary`). Resuming from the one before redoes those steps,
    deterministically.
    """
    steps = {int(m[1]): path for path in checkpoint_dir.glob("checkpoint-*")
             if (m := re.fullmatch(r"checkpoint-(\d+)", path.name))}
    for step in sorted(steps, reverse=True):
        try:
            state = json.loads((steps[step] / "trainer_state.json").read_text())
        except (OSError, ValueError):
            continue
        if not 0 < state.get("max_steps", 0) <= state.get("global_step", 0) and resumable(step):
            return str(steps[step])
    return None


def generation_boundary(args) -> Callable[[int], bool]:
    """Whether a checkpoint at an optimizer step can be resumed exactly under a GRPO-family config.

    TRL's GRPO and RLOO trainers generate once per `steps_per_generation * num_iterations` micro-steps and train
    on the buffered rollouts in between; neither the buffer nor the place in it is checkpointed, so a run resumed
    inside such a cycle generates afresh and trains on other samples than an unbroken run (measured: other
    weights from the first step after it). Only a checkpoint at a cycle's end resumes to the same numbers.
    Other configs: every step.
    """
    per_generation = getattr(args, "steps_per_generation", None)
    if per_generation is None:
        return lambda step: True
    cycle = per_generation * getattr(args, "num_iterations", 1)
    return lambda step: step * args.gradient_accumulation_steps % cycle == 0


# Left out of metrics: timings (they go to the manifest), and TRL's `num_tokens`, which counts the
# tokens this trainer object saw, so after a resume only those since the checkpoint.
UNREPRODUCIBLE_KEYS = ("runtime", "per_second", "total_flos", "_time", "num_tokens")


def numeric(metrics: dict[str, Any]) -> dict[str, float]:
    """Numbers only, and only those that reproduce exactly (see UNREPRODUCIBLE_KEYS)."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
            and not any(t in k for t in UNREPRODUCIBLE_KEYS)}


def train(trainer, checkpoint_dir: Path, stage_dir: Path, *, initial: tuple[str, ...] = ()) -> dict[str, float]:
    """Train (resuming from the newest checkpoint if one exists), evaluate, keep the log history.

    `initial` names held-out metrics of the starting model, returned as `initial_<name>`. The
    Trainer measures them at step 0 (its config made with `eval_on_start`): `evaluate()` before `train()`
    is refused under DeepSpeed ZeRO-1/2, and a resumed run finds the step-0 numbers in its checkpoint's log.
    """
    resume = last_checkpoint(checkpoint_dir, generation_boundary(trainer.args))
    if trainer.eval_dataset is not None:  # each evaluation says what it measures, and is timed for the report
        announced(trainer)
    if resume:
        trainer.accelerator.print(f"resuming from {resume}", flush=True)  # once, from the main process
    newest = last_checkpoint(checkpoint_dir)
    if newest != resume:
        trainer.accelerator.print(f"passing over {newest}: taken inside a generation cycle, whose rollouts TRL does "
                                  "not save (resumable: checkpoints at multiples of steps_per_generation x "
                                  "num_iterations micro-steps)", flush=True)

    # StageProgress (from `stage_callbacks`) prints a line every few seconds instead; transformers adds one of
    # these two to every Trainer whatever its config (the logs are kept: log_history.json, any `report_to`).
    for noisy in (ProgressCallback, PrinterCallback):
        trainer.remove_callback(noisy)
    # Activation checkpointing trades time for memory; on CPU without huge pages the allocator's heap would
    # keep most of what it saves, unless freed activations are unmapped (pipeline/runtime/memory.py).
    lean = trainer.args.activation_checkpointing and trainer.args.device.type == "cpu" and not huge_pages_on()
    measured_at_start = trainer.args.eval_on_start
    if resume:  # the step-0 evaluation is in the checkpoint's log; transformers would run (and log) it again
        trainer.args.eval_on_start = False
    with loss_tiles_for(trainer.args.device), freed_memory_returned(lean), tied_keys_not_missing(trainer.model):
        result = trainer.train(resume_from_checkpoint=resume)
        metrics = {f"train_{k}" if not k.startswith("train") else k: v for k, v in result.metrics.items()}
        whole_run = mean_train_loss(trainer.state.log_history)
        if whole_run is not None:  # over every step, also after a resume (and so in the log's closing row)
            metrics["train_loss"] = whole_run
            closing = next((row for row in reversed(trainer.state.log_history) if "train_loss" in row), None)
            if closing is not None:
                closing["train_loss"] = whole_run
        metrics.update(trainer.evaluate() if trainer.eval_dataset is not None else {})
    trainer.args.eval_on_start = measured_at_start
    if initial and measured_at_start:  # a recipe may turn it off: then there are no initial metrics
        first = next(row for row in trainer.state.log_history if all(k in row for k in initial))
        metrics.update({f"initial_{k}": first[k] for k in initial})
    if trainer.is_world_process_zero():
        history = trainer.state.log_history
        (stage_dir / "log_history.json").write_text(json.dumps(history, indent=1))
    return numeric(metrics)


class TrainerStage:
    """The protocol every Trainer-based stage follows, kept in one place so that no step can be left out.

    Made with the stage: `args`, the stage's config (the pipeline's defaults, then the recipe's `defaults:` and
    `args`), and the callbacks every stage's Trainer needs (divergence guard, run health, progress). `build`
    makes the Trainer with both and gives a quantized model's trainable parameters their compute dtype again
    (before any held-out measurement generates with it). `fit` trains (resuming), runs the stage's
    `after_training` and saves. A Trainer built any other way is refused by `fit`: without the callbacks a
    diverged or unhealthy run would pass silently.
    """

    def __init__(self, spec, ctx, model, *, extra_args: dict[str, Any] | None = None, eval_on_start: bool = False):
        self.spec, self.ctx = spec, ctx
        self.args = make_config(spec.args_class, {**(extra_args or {}), **ctx.recipe.stage_args(spec)},
                                output_dir=str(ctx.checkpoint_dir), seed=ctx.seed, model=model,
                                eval_on_start=eval_on_start)
        self.callbacks = stage_callbacks(spec.name, ctx.health)

    def build(self, trainer_class: type, **kwargs: Any):
        """`trainer_class(args=..., callbacks=..., **kwargs)`, its trainable parameters in the compute dtype."""
        trainer = trainer_class(args=self.args, callbacks=self.callbacks, **kwargs)
        match_trainable_dtype(trainer.model, self.spec.quantization)
        return trainer

    def fit(self, trainer, tokenizer, *, initial: tuple[str, ...] = (), merge_default: bool = False,
            after_training: Callable[[dict[str, float]], None] | None = None) -> dict[str, float]:
        """Train, let `after_training` add to the metrics (and ready the tokenizer), save; the stage's metrics."""
        if trainer.args is not self.args or any(c not in trainer.callback_handler.callbacks for c in self.callbacks):
            raise RuntimeError(f"stage '{self.spec.name}': its Trainer was not made by `TrainerStage.build`")
        metrics = train(trainer, self.ctx.checkpoint_dir, self.ctx.stage_dir, initial=initial)
        if after_training is not None:
            after_training(metrics)
        save(trainer, tokenizer, self.spec, self.ctx, merge_default=merge_default)
        return metrics


def tied_parameter_names(model) -> set[str]:
    """Names of parameters that share their tensor with another (a head tied to the input embeddings)."""
    names: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(parameter), []).append(name)
    return {name for group in names.values() if len(group) > 1 for name in group}


@contextlib.contextmanager
def tied_keys_not_missing(model) -> Iterator[None]:
    """Drop the Trainer's "missing keys ['lm_head.weight']" on resuming a model whose head is tied to its
    embeddings: a checkpoint keeps one copy of shared tensors, and loading the embeddings restores the head.
    Keys missing beyond the tied ones are still reported."""
    tied = tied_parameter_names(model)

    def keep(record: logging.LogRecord) -> bool:
        found = re.search(r"missing keys in the checkpoint model loaded: (\[.*\])", record.getMessage())
        return not (found and set(ast.literal_eval(found[1])) <= tied)
    logger = logging.getLogger("transformers.trainer")
    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


def announced(trainer) -> None:
    """Make the Trainer's held-out evaluations (at step 0, every `eval_steps`, at the end) say so when they start,
    and count their time (`pipeline.runtime.progress.held_out_evaluation`)."""
    evaluate = trainer.evaluate

    def evaluate_announced(*args, **kwargs):
        with held_out_evaluation("held-out evaluation (loss and metrics)", len(trainer.eval_dataset),
                                 trainer.is_world_process_zero()):
            return evaluate(*args, **kwargs)
    trainer.evaluate = evaluate_announced


def save(trainer, tokenizer, spec, ctx, *, merge_default: bool = False) -> None:
    """Write the trained model (or adapter, or adapter merged into its base) and tokenizer to the stage output."""

    merge = spec.peft is not None and spec.peft.merges(merge_default)
    target = ctx.stage_dir / "adapter.partial" if merge else ctx.output_dir
    model = trainer.accelerator.unwrap_model(trainer.model)
    if "ref" in getattr(model, "peft_config", {}):  # TRL's frozen reference copy of a continued adapter
        model.delete_adapter("ref")
    trainer.save_model(str(target))  # gathers ZeRO-3/FSDP shards; main process writes
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(target)
        if merge:
            save_merged(target, ctx.output_dir, trust_remote_code=spec.trust_remote_code, task=spec.model_task)
            shutil.rmtree(target)
