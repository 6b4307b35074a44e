"""`ppo` stage: RLHF with the project's PPO trainer (`pipeline.algorithms.ppo_trainer`), from an SFT stage,
rewarded by a reward model.

With `peft`, policy and critic are two LoRA adapters on one base, and the reference is the base
with adapters disabled; without, the critic trunk and the reference are copies of the policy.
The stage owns what lies outside the algorithm: it resumes from and saves checkpoints (through the
trainer's `on_step_end` hook), and reports held-out greedy scores, accuracy and KL to the reference
before and after.
"""

from __future__ import annotations

import copy
import json
import shutil

import torch
from peft import get_peft_model
from transformers import AutoModelForSequenceClassification

from pipeline.algorithms.ppo_trainer.checkpointing import Checkpoints
from pipeline.algorithms.ppo_trainer.config import PPOConfig
from pipeline.algorithms.ppo_trainer.evaluation import evaluate
from pipeline.algorithms.ppo_trainer.models import ActorCritic, decoder_trunk
from pipeline.algorithms.ppo_trainer.trainer import PPOTrainer
from pipeline.data.answers import answer_check
from pipeline.data.formats import as_prompts
from pipeline.data.loading import DataError, require_reward_columns
from pipeline.models.loading import (
    compute_dtype,
    keep_4bit_layers_differentiable,
    load_causal_lm,
    load_tokenizer,
    quantization_config,
    stage_base,
)
from pipeline.models.reward_functions import build_reward_terms
from pipeline.runtime.progress import held_out_evaluation
from pipeline.stages.context import StageContext
from pipeline.stages.specs.ppo import PPOSpec
from pipeline.training.health import first_and_last_quarter
from pipeline.training.length_checks import check_prompt_lengths
from pipeline.training.trainers import make_config


def build_models(spec: PPOSpec, path: str, init_std: float, value_model_path: str | None = None,
                 critic: bool = True):
    """(ActorCritic, frozen reference or None when the reference is the adapter-free base); `critic` False builds
    none (the critic-free estimators: no value model in memory)."""
    policy = load_causal_lm(path, quantization=spec.quantization, trust_remote_code=spec.trust_remote_code,
                            revision=spec.revision)
    hidden_size = policy.config.get_text_config().hidden_size
    reference = None if spec.peft is not None else copy.deepcopy(policy).eval().requires_grad_(False)
    if spec.peft is not None:
        policy = get_peft_model(policy, spec.peft.lora_config("CAUSAL_LM"), adapter_name="policy")
    if not critic:
        return ActorCritic(policy, None, None), reference
    if value_model_path is not None:
        trunk, head = critic_from_reward_model(spec, value_model_path)
        return ActorCritic(policy, trunk, head), reference
    if spec.peft is not None:
        policy.add_adapter("value", spec.peft.lora_config("CAUSAL_LM"))
        return ActorCritic.with_new_head(policy, None, hidden_size, init_std), None
    critic_trunk = copy.deepcopy(decoder_trunk(policy))  # the transformer without its LM head
    return ActorCritic.with_new_head(policy, critic_trunk, hidden_size, init_std), reference


def critic_from_reward_model(spec: PPOSpec, path: str):
    """(trunk, value head) from a sequence-classification reward model: its transformer and its score head.

    The score head already maps a hidden state to the reward model's scale, so V starts near the score of
    the text so far instead of at 0. With `peft`, the trunk trains a LoRA adapter and the head in full.
    """
    model = AutoModelForSequenceClassification.from_pretrained(
        path, dtype=compute_dtype(), use_safetensors=True, trust_remote_code=spec.trust_remote_code,
        quantization_config=quantization_config(spec.quantization))
    keep_4bit_layers_differentiable(model)
    head = getattr(model, "score", None)  # decoder reward models (transformers' *ForSequenceClassification)
    if not isinstance(head, torch.nn.Linear) or head.out_features != 1:
        raise DataError(f"stage '{spec.name}': value_model {path} is not a one-score decoder reward model "
                        "(a `reward` stage's output); the critic needs its per-token score head")
    trunk = decoder_trunk(model)
    if spec.peft is not None:
        trunk = get_peft_model(trunk, spec.peft.lora_config("FEATURE_EXTRACTION"))
    head.requires_grad_(True)
    return trunk, head


def require_same_vocabulary(policy_tokenizer, other_tokenizer, what: str) -> None:
    """The critic reads the policy's token ids: both tokenizers must map text to the same ids."""
    if policy_tokenizer.get_vocab() != other_tokenizer.get_vocab():
        raise DataError(f"{what} has a different tokenizer from the policy; a critic must read the policy's "
                        "tokens (train the reward model from the same SFT model, or leave value_model out)")


def save_policy(model, tokenizer, spec: PPOSpec, ctx: StageContext) -> None:
    """The policy alone: its LoRA adapter (or merged weights), or full weights."""
    out = ctx.output_dir
    policy = model.policy
    if spec.peft is None:
        policy.save_pretrained(out, safe_serialization=True)
    elif spec.peft.merges(False):
        policy.set_adapter("policy")
        if "value" in policy.peft_config:
            policy.delete_adapter("value")
        policy.merge_and_unload().save_pretrained(out, safe_serialization=True)
    else:
        policy.save_pretrained(out, selected_adapters=["policy"], safe_serialization=True)
        for item in (out / "policy").iterdir():  # peft nests non-"default" adapters in a subfolder
            shutil.move(str(item), out / item.name)
        (out / "policy").rmdir()
    tokenizer.save_pretrained(out)


def held_out_scores(trainer: PPOTrainer, held_out, is_correct) -> dict[str, float]:
    """`evaluate` on the held-out rows, announced and timed; nothing where there are none (`eval_samples: 0`)."""
    if not len(held_out):
        return {}
    with held_out_evaluation("held-out greedy rewards, accuracy and KL", len(held_out),
                             trainer.accelerator.is_main_process):
        return evaluate(trainer, held_out, is_correct)


def run(spec: PPOSpec, ctx: StageContext) -> dict[str, float]:
    where = f"stage '{spec.name}'"
    splits = ctx.splits(spec.dataset)
    config: PPOConfig = make_config(spec.args_class, ctx.recipe.stage_args(spec), output_dir=str(ctx.checkpoint_dir),
                                    seed=ctx.seed)
    path = stage_base(ctx.resolve(spec.model), ctx.stage_dir, trust_remote_code=spec.trust_remote_code)
    tokenizer = load_tokenizer(path, trust_remote_code=spec.trust_remote_code, revision=spec.revision)
    train, held_out = (as_prompts(rows, where, tokenizer) for rows in splits)  # as the policy was trained on them
    terms = spec.reward_terms()
    require_reward_columns(terms, train.column_names, where)
    value_model = ctx.resolve(spec.value_model) if spec.value_model else None
    if value_model is not None:
        require_same_vocabulary(tokenizer, load_tokenizer(value_model, trust_remote_code=spec.trust_remote_code),
                                f"{where}: value_model {spec.value_model}")
    model, reference = build_models(spec, path, config.value_head_init_std, value_model, critic=config.uses_critic)
    is_correct = answer_check(spec.answer_extractor)
    functions, weights, names = build_reward_terms(terms, ctx.resolve, is_correct)
    for prompts, what in ((train, "training prompts"), (held_out, "held-out prompts")):
        check_prompt_lengths(model.policy.config, tokenizer, list(prompts["prompt"]), config.max_new_tokens, where,
                             what, "args.max_new_tokens")
    trainer = PPOTrainer(config, model, tokenizer, train, functions, weights, names, ref_model=reference)

    initial = held_out_scores(trainer, held_out, is_correct)  # policy == reference here: the SFT model's numbers
    ctx.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    checkpoints = Checkpoints(trainer, ctx.checkpoint_dir)
    checkpoints.resume()
    history = trainer.train(on_step_end=[checkpoints.on_step_end, ctx.health.step_hook(config.max_steps)])
    final = held_out_scores(trainer, held_out, is_correct)
    metrics = {**final, **{f"initial_{k}": v for k, v in initial.items()}}
    metrics.update(first_and_last_quarter(history, ("reward", "kl")))
    if ctx.is_main_process:
        (ctx.stage_dir / "log_history.json").write_text(json.dumps(history, indent=1))
        save_policy(trainer.unwrapped, tokenizer, spec, ctx)
    return metrics
