"""`kto` stage: Kahneman-Tversky optimisation with `trl.KTOTrainer`.

KTO learns from single completions marked desirable or not: unpaired rows (`prompt`, `completion`,
`label` true/false) as they are, or any preference format of `pipeline.data.preferences`, unpaired with
`trl.unpair_preference_dataset` (chosen -> true, rejected -> false) and shuffled, so that every batch
holds both kinds (TRL trains in file order, which unpairing leaves all-chosen, then all-rejected). The
reference is frozen as in `dpo`: with `peft` it is the base with the adapter disabled. `beta`,
`desirable_weight` and `undesirable_weight` come through `args`.
"""

from __future__ import annotations

from dataclasses import dataclass

from datasets import Dataset
from trl import KTOTrainer, unpair_preference_dataset

from pipeline.config.specs import PREFERENCE_FORMATS, TrainStageSpec
from pipeline.data.loading import DataError, require_columns
from pipeline.data.preferences import to_pairwise
from pipeline.data.prompts import as_model_rows
from pipeline.models.loading import load_policy, load_tokenizer, starting_point
from pipeline.stages.context import StageContext
from pipeline.stages.contract import StageType
from pipeline.training.trainers import TrainerStage, evaluated

KTO_FORMATS = {"unpaired": ("prompt", "completion", "label"), **PREFERENCE_FORMATS}


@dataclass(kw_only=True)
class KTOSpec(TrainStageSpec):
    """Kahneman-Tversky optimisation with `trl.KTOTrainer` on completions labelled desirable or not, or preferences."""

    args_class = "trl.KTOConfig"
    preference_data = True  # besides its own unpaired rows
    headline_metrics = (("reward margin", "initial_eval_rewards/margins", "eval_rewards/margins"),)
    # TRL's KTO logs no pair accuracy: `reward_accuracy_stuck` reads the held-out margin instead
    health_checks = TrainStageSpec.health_checks + ("chosen_logp_falling", "reward_accuracy_stuck")
    health_names = {**TrainStageSpec.health_names, "chosen_logp": "logps/chosen", "margin": "eval_rewards/margins"}

    def check(self) -> list[str]:
        """What TRL's KTOTrainer refuses only when the stage starts (its KL estimate pairs rows within a batch)."""
        args = self.args or {}
        if args.get("loss_type", "kto") == "apo_zero_unpaired":  # the one loss without the KL estimate
            return []
        problems = []
        sampling = args.get("train_sampling_strategy", "sequential")
        if sampling != "sequential":
            problems.append("args.train_sampling_strategy: the kto loss needs `sequential` (its KL term pairs each "
                            f"row with its neighbour in the batch), got '{sampling}'")
        batch = args.get("per_device_train_batch_size", 8)
        if isinstance(batch, int) and batch < 2:
            problems.append("args.per_device_train_batch_size: the kto loss needs at least 2 rows a batch (its KL "
                            f"term pairs rows within a batch), got {batch}")
        return problems

    def formats(self) -> dict[str, tuple[str, ...]]:
        return KTO_FORMATS


def unpaired(dataset: Dataset, where: str, seed: int) -> Dataset:
    """`dataset` as KTO's `prompt`/`completion`/`label` rows: labels checked, or preferences unpaired and shuffled."""

    if require_columns(dataset, KTO_FORMATS, where) != "unpaired":
        return unpair_preference_dataset(to_pairwise(dataset, where)).shuffle(seed=seed)
    not_bool = [i for i, label in enumerate(dataset["label"]) if not isinstance(label, bool)]
    if not_bool:
        raise DataError(f"{where}: `label` must be true (desirable) or false (undesirable); {len(not_bool)} row(s) "
                        f"are not, such as {dataset['label'][not_bool[0]]!r}")
    return dataset


def run(spec: KTOSpec, ctx: StageContext) -> dict[str, float]:
    where = f"stage '{spec.name}'"
    train, held_out = (unpaired(split, where, ctx.seed) if len(split) else split for split in ctx.splits(spec.dataset))
    path = starting_point(spec, ctx.stage_dir, ctx.resolve(spec.model))  # see modeling.stage_base
    tokenizer = load_tokenizer(path, trust_remote_code=spec.trust_remote_code, revision=spec.revision)
    train, held_out = as_model_rows(train, tokenizer), as_model_rows(held_out, tokenizer)  # as the model was trained
    model, peft_config = load_policy(path, spec)
    stage = TrainerStage(spec, ctx, model, eval_on_start=len(held_out) > 0)
    trainer = stage.build(KTOTrainer, model=model, train_dataset=train, eval_dataset=evaluated(held_out),
                          processing_class=tokenizer, peft_config=peft_config)
    return stage.fit(trainer, tokenizer, initial=("eval_loss", "eval_rewards/margins", "eval_kl"))


STAGE = StageType("kto", KTOSpec, run)
