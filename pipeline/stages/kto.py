"""`kto` stage: Kahneman-Tversky optimisation with `trl.KTOTrainer`.

KTO learns from single completions marked desirable or not: unpaired rows (`prompt`, `completion`,
`label` true/false) as they are, or any preference format of `pipeline.data.preferences`, unpaired with
`trl.unpair_preference_dataset` (chosen -> true, rejected -> false) and shuffled, so that every batch
holds both kinds (TRL trains in file order, which unpairing leaves all-chosen, then all-rejected). The
reference is frozen as in `dpo`: with `peft` it is the base with the adapter disabled. `beta`,
`desirable_weight` and `undesirable_weight` come through `args`.
"""

from __future__ import annotations

from datasets import Dataset
from trl import KTOTrainer, unpair_preference_dataset

from pipeline.data.checks import Rows, label_problems
from pipeline.data.loading import DataError, require_columns
from pipeline.data.preferences import to_pairwise
from pipeline.data.prompts import as_model_rows
from pipeline.models.loading import load_policy, load_tokenizer, starting_point
from pipeline.stages.context import StageContext
from pipeline.stages.specs.kto import KTOSpec, KTO_FORMATS
from pipeline.training.length_checks import check_kto_lengths
from pipeline.training.trainers import TrainerStage, evaluated

def unpaired(dataset: Dataset, where: str, seed: int) -> Dataset:
    """`dataset` as KTO's `prompt`/`completion`/`label` rows: labels checked, or preferences unpaired and shuffled."""

    if require_columns(dataset, KTO_FORMATS, where) != "unpaired":
        return unpair_preference_dataset(to_pairwise(dataset, where)).shuffle(seed=seed)
    # validate's check, again per split: TRL's KTO loss needs both kinds in each (else a bare StopIteration)
    problems = label_problems(dataset, Rows(where, "row", list(range(1, len(dataset) + 1))))
    if problems:
        raise DataError("\n".join(problems))
    return dataset


def run(spec: KTOSpec, ctx: StageContext) -> dict[str, float]:
    where = f"stage '{spec.name}'"
    train, held_out = ctx.splits(spec.dataset)
    train = unpaired(train, where, ctx.seed)
    held_out = unpaired(held_out, f"{where} (held-out split)", ctx.seed) if len(held_out) else held_out
    path = starting_point(spec, ctx.stage_dir, ctx.resolve(spec.model))  # see modeling.stage_base
    tokenizer = load_tokenizer(path, trust_remote_code=spec.trust_remote_code, revision=spec.revision)
    train, held_out = as_model_rows(train, tokenizer), as_model_rows(held_out, tokenizer)  # as the model was trained
    model, peft_config = load_policy(path, spec)
    stage = TrainerStage(spec, ctx, model, eval_on_start=len(held_out) > 0)
    trainer = stage.build(KTOTrainer, model=model, train_dataset=train, eval_dataset=evaluated(held_out),
                          processing_class=tokenizer, peft_config=peft_config)
    lengths = check_kto_lengths(trainer, (len(train), len(held_out)), where)  # rows TRL dropped, before training
    return stage.fit(trainer, tokenizer, initial=("eval_loss", "eval_rewards/margins", "eval_kl"),
                     after_training=lambda metrics: metrics.update(lengths))
