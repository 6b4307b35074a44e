"""`pretrain` stage: a causal LM from a fresh config (or a loaded model) trained on packed text."""

from __future__ import annotations

import math
from typing import Any

from peft import get_peft_model
from transformers import AutoModelForCausalLM, DataCollatorForLanguageModeling, Trainer
from trl import pack_dataset

from pipeline.data.loading import DataError, require_columns
from pipeline.models.loading import load_causal_lm, load_tokenizer, stage_base
from pipeline.stages.context import StageContext
from pipeline.stages.specs.pretrain import PretrainSpec, fresh_config
from pipeline.training.trainers import TrainerStage, evaluated


def fresh_model(config_spec: dict[str, Any], tokenizer, block_size: int):
    """A randomly initialised causal LM for `tokenizer`."""

    tokens = {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
              "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    return AutoModelForCausalLM.from_config(fresh_config(config_spec, block_size, tokens))


def pack(dataset, tokenizer, text_column: str, block_size: int):
    """Tokenize, end each document with EOS, and cut the stream into `block_size` blocks with TRL's
    `pack_dataset` ("wrapped": documents run across block boundaries, as in pretraining). Packing works on
    1000 rows at a time; the shorter last block of each such batch is dropped, so every block is full."""
    eos = [tokenizer.eos_token_id]

    def tokenize(batch):
        return {"input_ids": [ids + eos for ids in tokenizer(batch[text_column], add_special_tokens=False)["input_ids"]]}

    tokenized = dataset.map(tokenize, batched=True, remove_columns=dataset.column_names)
    packed = pack_dataset(tokenized, block_size, strategy="wrapped", map_kwargs={"batch_size": 1000})
    return packed.filter(lambda row: len(row["input_ids"]) == block_size)


def run(spec: PretrainSpec, ctx: StageContext) -> dict[str, float]:
    tokenizer_ref = spec.tokenizer or spec.model
    tokenizer = load_tokenizer(ctx.resolve(tokenizer_ref), trust_remote_code=spec.trust_remote_code)
    train, held_out = ctx.splits(spec.dataset)
    require_columns(train, spec.formats(), f"stage '{spec.name}'")
    train_blocks = pack(train, tokenizer, spec.text_column, spec.block_size)
    eval_blocks = pack(held_out, tokenizer, spec.text_column, spec.block_size)
    if len(train_blocks) == 0 or (len(held_out) and len(eval_blocks) == 0):
        raise DataError(f"stage '{spec.name}': too little text for one {spec.block_size}-token block "
                        "in the train or held-out split; lower block_size or add data")

    if isinstance(spec.model, dict):
        model = fresh_model(spec.model, tokenizer, spec.block_size)
    else:
        path = stage_base(ctx.resolve(spec.model), ctx.stage_dir, trust_remote_code=spec.trust_remote_code)
        model = load_causal_lm(path, quantization=spec.quantization,
                               trust_remote_code=spec.trust_remote_code, revision=spec.revision)
    if spec.peft is not None:
        model = get_peft_model(model, spec.peft.lora_config("CAUSAL_LM"))

    stage = TrainerStage(spec, ctx, model)
    trainer = stage.build(Trainer, model=model, train_dataset=train_blocks, eval_dataset=evaluated(eval_blocks),
                          data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))

    def after_training(metrics: dict[str, float]) -> None:
        if "eval_loss" in metrics:
            metrics["eval_perplexity"] = math.exp(min(metrics["eval_loss"], 50.0))
        metrics["num_parameters"] = float(sum(p.numel() for p in model.parameters()))
    return stage.fit(trainer, tokenizer, after_training=after_training)
