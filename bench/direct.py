"""The same work as the pipeline's stages, written as the minimal script a TRL user would write:
load the model and rows, build the config and trainer (one function per stage type), train, save
(`run_script`). The rows are the ones the pipeline hands its trainer (same files, same shuffle; the
pipeline's own packing for pretraining)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from datasets import load_dataset
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    Trainer,
    TrainingArguments,
)
from trl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer, RewardConfig, RewardTrainer, SFTConfig, SFTTrainer

from bench.workloads import SEED, WORKLOADS
from pipeline.algorithms.ppo_trainer.checkpointing import Checkpoints
from pipeline.algorithms.ppo_trainer.config import PPOConfig
from pipeline.algorithms.ppo_trainer.trainer import PPOTrainer
from pipeline.models.reward_functions import exact_match_reward
from pipeline.stages.ppo import PPOSpec, build_models
from pipeline.stages.pretrain import pack


def rows(path: Path, columns: list[str]):
    return load_dataset("json", data_files=str(path), split="train").select_columns(columns).shuffle(seed=SEED)


def causal_lm(model_dir: Path):
    return AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)


def pretrain(model_dir: Path, train: Path, args: dict[str, Any], out: Path) -> Any:
    model, tokenizer = causal_lm(model_dir)
    blocks = pack(rows(train, ["text"]), tokenizer, "text", WORKLOADS["pretrain"].stage["block_size"])
    return Trainer(model=model, args=TrainingArguments(output_dir=str(out), **args), train_dataset=blocks,
                   data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))


def sft(model_dir: Path, train: Path, args: dict[str, Any], out: Path) -> Any:
    model, tokenizer = causal_lm(model_dir)
    data = rows(train, ["messages"]).map(lambda r: {"prompt": r["messages"][:-1], "completion": r["messages"][-1:]},
                                         remove_columns=["messages"])
    return SFTTrainer(model=model, args=SFTConfig(output_dir=str(out), **args), train_dataset=data,
                      processing_class=tokenizer)


def reward(model_dir: Path, train: Path, args: dict[str, Any], out: Path) -> Any:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    return RewardTrainer(model=model, args=RewardConfig(output_dir=str(out), **args),
                         train_dataset=rows(train, ["prompt", "chosen", "rejected"]), processing_class=tokenizer)


def dpo(model_dir: Path, train: Path, args: dict[str, Any], out: Path) -> Any:
    model, tokenizer = causal_lm(model_dir)
    return DPOTrainer(model=model, args=DPOConfig(output_dir=str(out), **args),
                      train_dataset=rows(train, ["prompt", "chosen", "rejected"]), processing_class=tokenizer)


def grpo(model_dir: Path, train: Path, args: dict[str, Any], out: Path) -> Any:
    model, tokenizer = causal_lm(model_dir)
    return GRPOTrainer(model=model, reward_funcs=[exact_match_reward()], args=GRPOConfig(output_dir=str(out), **args),
                       train_dataset=rows(train, ["prompt", "answer"]), processing_class=tokenizer)


def ppo(model_dir: Path, train: Path, args: dict[str, Any], out: Path) -> Any:
    """The project's own PPO trainer driven directly (there is no TRL one), as bench/ppo_vs_grpo.py does."""

    known = {f.name for f in dataclasses.fields(PPOConfig)}  # it has no activation_checkpointing
    config = PPOConfig(output_dir=str(out), **{k: v for k, v in args.items() if k in known})
    spec = PPOSpec(name="direct", type="ppo", model=str(model_dir), dataset=None)
    model, reference = build_models(spec, str(model_dir), config.value_head_init_std)
    prompts = rows(train, ["prompt", "answer"])
    return PPOTrainer(config, model, AutoTokenizer.from_pretrained(model_dir), prompts, [exact_match_reward()], [1.0],
                      ["exact_match"], ref_model=reference)


SCRIPTS = {"pretrain": pretrain, "sft": sft, "reward": reward, "dpo": dpo, "grpo": grpo, "ppo": ppo}


def run_script(stage: str, model_dir: Path, train: Path, args: dict[str, Any], out: Path) -> None:
    trainer = SCRIPTS[stage](model_dir, train, args, out)
    if stage == "ppo":
        checkpoints = Checkpoints(trainer, out)  # as the stage does: resume, then save every `save_steps`
        checkpoints.resume()
        trainer.train(on_step_end=[checkpoints.on_step_end])
        trainer.unwrapped.policy.save_pretrained(out)
    else:
        trainer.train()
        trainer.save_model()
