"""`reward` stage: a one-score sequence-classification model trained with `trl.RewardTrainer`.

Loss is Bradley-Terry, -log sigmoid(r_chosen - r_rejected). Pairs are tokenized here (see
`reward_functions.encode`) so over-long pairs are truncated from the left instead of silently dropped.
"""

from __future__ import annotations

from accelerate import PartialState
from transformers import AutoModelForSequenceClassification
from trl import RewardTrainer

from pipeline.data.preferences import pairwise_splits
from pipeline.data.prompts import record_prompt_format
from pipeline.models.loading import (
    compute_dtype,
    held_back_load_report,
    keep_4bit_layers_differentiable,
    load_tokenizer,
    quantization_config,
    stage_base,
)
from pipeline.models.reward_functions import encode, max_tokens
from pipeline.stages.context import StageContext
from pipeline.stages.specs.reward import RewardSpec
from pipeline.training.length_checks import check_padding
from pipeline.training.trainers import TrainerStage, batch_by_length, evaluated


def tokenize_pairs(dataset, tokenizer, max_length: int | None):
    """chosen_ids/rejected_ids columns (TRL's pre-tokenized format) and how many pairs were truncated."""

    def tokenize(row):
        full = [encode(tokenizer, row["prompt"], row[k]) for k in ("chosen", "rejected")]
        cut = [encode(tokenizer, row["prompt"], row[k], max_length) for k in ("chosen", "rejected")]
        return {"chosen_ids": cut[0], "rejected_ids": cut[1], "truncated": full != cut}

    if not len(dataset):  # no held-out rows (`eval_samples: 0`)
        return dataset, 0
    tokenized = dataset.map(tokenize, remove_columns=dataset.column_names)
    truncated = sum(tokenized["truncated"])
    return tokenized.remove_columns("truncated"), truncated


def pair_length(row: dict) -> int:
    """Tokens a tokenized pair pads its batch to: its longer sequence (prompt included)."""
    return max(len(row["chosen_ids"]), len(row["rejected_ids"]))


HEAD_PREFIXES = ("score.", "classifier.")  # the one-score head transformers adds to a causal LM (or an encoder)


def load_reward_model(path: str, spec: RewardSpec, tokenizer):
    """AutoModelForSequenceClassification with one label, from full weights (see `modeling.stage_base`)."""

    kwargs = {"quantization_config": quantization_config(spec.quantization)} if spec.quantization else {}
    # transformers reports the score head's fresh weights as MISSING in a table; that is expected here, so its
    # report is held back and only weights missing beyond the head are reported.
    with held_back_load_report():
        model, loading = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=1, dtype=compute_dtype(), use_safetensors=True, revision=spec.revision,
            trust_remote_code=spec.trust_remote_code, output_loading_info=True, **kwargs)
    head = {name for name, _ in model.named_parameters() if name.startswith(HEAD_PREFIXES)}
    unexpected = [key for key in loading["missing_keys"] if key not in head]
    if unexpected:
        print(f"stage '{spec.name}': weights not in {path}, initialised fresh: {', '.join(unexpected[:8])}"
              + (f" and {len(unexpected) - 8} more" if len(unexpected) > 8 else ""), flush=True)
    model.config.pad_token_id = tokenizer.pad_token_id  # marks where each sequence ends for pooling
    return keep_4bit_layers_differentiable(model)


def run(spec: RewardSpec, ctx: StageContext) -> dict[str, float]:
    where = f"stage '{spec.name}'"
    train, held_out = pairwise_splits(ctx.splits(spec.dataset), where)
    # an upstream adapter merged (or a GGUF file dequantized) once: the score head is built on that model
    path = stage_base(ctx.resolve(spec.model), ctx.stage_dir, trust_remote_code=spec.trust_remote_code)
    tokenizer = load_tokenizer(path, trust_remote_code=spec.trust_remote_code, revision=spec.revision)
    if tokenizer.pad_token is None:  # encoders without EOS or PAD: add one rather than fail
        tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    model = load_reward_model(path, spec, tokenizer)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    stage = TrainerStage(spec, ctx, model, eval_on_start=len(held_out) > 0)
    # At most what the model's positions take (an encoder's 512 under TRL's default max_length of 1024)
    max_length = min((n for n in (stage.args.max_length, max_tokens(tokenizer, model.config)) if n), default=None)
    train_ids, truncated_train = tokenize_pairs(train, tokenizer, max_length)
    eval_ids, truncated_eval = tokenize_pairs(held_out, tokenizer, max_length)
    if truncated_train or truncated_eval:
        PartialState().print(f"{where}: {truncated_train} training and {truncated_eval} held-out pairs were longer "
                             f"than max_length={max_length} and were cut from the left (final replies kept)", flush=True)
    trainer = stage.build(RewardTrainer, model=model, train_dataset=train_ids, eval_dataset=evaluated(eval_ids),
                          processing_class=tokenizer,
                          peft_config=spec.peft.lora_config("SEQ_CLS") if spec.peft is not None else None)
    batch_by_length(trainer, pair_length)
    check_padding(trainer, pair_length, where)

    def after_training(metrics: dict[str, float]) -> None:
        metrics.update(truncated_pairs=float(truncated_train + truncated_eval))
        # The saved tokenizer cuts as training did, so `tokenizer(text, truncation=True)` scores what was trained on.
        tokenizer.truncation_side = "left"
        if max_length is not None:
            tokenizer.model_max_length = max_length
        if tokenizer.chat_template is None and len(train):  # what a later plain-text prompt is scored as (`encode`)
            record_prompt_format(tokenizer, isinstance(train[0]["prompt"], list))
    # initial_eval_accuracy: the untrained score head's, near chance, measured not assumed. Downstream stages
    # (GRPO, PPO, eval) score with a plain model, so an adapter is merged by default.
    return stage.fit(trainer, tokenizer, initial=("eval_accuracy",), merge_default=True, after_training=after_training)
