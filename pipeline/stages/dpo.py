"""`dpo` stage: direct preference optimisation with `trl.DPOTrainer`.

The reference is frozen: with `peft` it is the base with the adapter disabled (no second copy
of the weights); without, TRL keeps a copy of the starting model. `beta` and `loss_type` come
through `args`. Over-long pairs keep their end (`truncation_mode: keep_end`) unless `args` say
otherwise, so the replies being compared are not the part cut away.
"""

from __future__ import annotations

from trl import DPOTrainer

from pipeline.data.preferences import pairwise_splits
from pipeline.data.prompts import as_model_rows
from pipeline.models.loading import load_policy, load_tokenizer, starting_point
from pipeline.stages.context import StageContext
from pipeline.stages.specs.dpo import DPOSpec
from pipeline.training.length_checks import check_dpo_lengths, check_padding
from pipeline.training.trainers import TrainerStage, batch_by_length, evaluated



def pair_length(row: dict) -> int:
    """Tokens a tokenized pair pads its batch to: the prompt and its longer reply."""
    return len(row["prompt_ids"]) + max(len(row["chosen_ids"]), len(row["rejected_ids"]))


def run(spec: DPOSpec, ctx: StageContext) -> dict[str, float]:
    where = f"stage '{spec.name}'"
    train, held_out = pairwise_splits(ctx.splits(spec.dataset), where)
    path = starting_point(spec, ctx.stage_dir, ctx.resolve(spec.model))  # see modeling.stage_base
    tokenizer = load_tokenizer(path, trust_remote_code=spec.trust_remote_code, revision=spec.revision)
    train, held_out = as_model_rows(train, tokenizer), as_model_rows(held_out, tokenizer)  # as the model was trained
    model, peft_config = load_policy(path, spec)
    stage = TrainerStage(spec, ctx, model, eval_on_start=len(held_out) > 0)
    trainer = stage.build(DPOTrainer, model=model, train_dataset=train, eval_dataset=evaluated(held_out),
                          processing_class=tokenizer, peft_config=peft_config)
    batch_by_length(trainer, pair_length)
    check_padding(trainer, pair_length, where)
    lengths = check_dpo_lengths(trainer, (len(train), len(held_out)), where)  # over-long pairs, before training
    return stage.fit(trainer, tokenizer, initial=("eval_loss", "eval_rewards/margins", "eval_rewards/accuracies"),
                     after_training=lambda metrics: metrics.update(lengths))
