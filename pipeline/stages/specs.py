"""The recipe keys of every stage type, typed and documented once (like TRL's config classes).

Kept free of heavy imports so `pipeline validate` is fast; `args` are checked against the
library class named by `args_class`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.recipe import DatasetSpec, StageSpec, TrainStageSpec

SFT_FORMATS = {
    "messages": ("messages",),
    "prompt-completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
    "self-instruct": ("instruction", "instances"),  # one row per instance {input, output}
    "text": ("text",),
}


@dataclass(kw_only=True)
class TokenizerSpec(StageSpec):
    """Train a byte-level BPE tokenizer on a corpus, or load an existing one."""

    dataset: DatasetSpec | None = None  # corpus to train on
    load: str | None = None  # instead of training: a local folder or Hub id to load
    text_column: str = "text"
    vocab_size: int = 1024
    min_frequency: int = 2
    chat_template: str | None = None  # Jinja template; default ChatML (<|im_start|>role ... <|im_end|>)
    model_max_length: int = 2048
    trust_remote_code: bool = False

    ref_fields = ("load",)

    def check(self) -> list[str]:
        if (self.dataset is None) == (self.load is None):
            return ["give exactly one of `dataset` (train a tokenizer) or `load` (use an existing one)"]
        return []

    def formats(self) -> dict[str, tuple[str, ...]]:
        return {"text": (self.text_column,)}


@dataclass(kw_only=True)
class PretrainSpec(TrainStageSpec):
    """Causal-LM training on plain text packed into fixed-length blocks."""

    # A mapping builds a fresh model: {architecture: llama|mixtral|<any model_type>, **config fields};
    # a string continues pretraining of an earlier stage, local folder or Hub id.
    model: str | dict[str, Any]
    tokenizer: str | None = None  # a tokenizer stage, folder or Hub id; default: the model's own
    text_column: str = "text"
    block_size: int = 128  # tokens per training sequence; documents are joined with EOS and cut into blocks

    ref_fields = ("model", "tokenizer")
    args_class = "transformers.TrainingArguments"

    def check(self) -> list[str]:
        if isinstance(self.model, dict):
            problems = [] if self.tokenizer else ["a fresh `model:` config needs `tokenizer:`"]
            if "architecture" not in self.model:
                problems.append("model: a fresh config needs `architecture` (e.g. llama, mixtral)")
            return problems
        return []

    def formats(self) -> dict[str, tuple[str, ...]]:
        return {"text": (self.text_column,)}


@dataclass(kw_only=True)
class SFTSpec(TrainStageSpec):
    """Supervised fine-tuning with `trl.SFTTrainer`; loss on completions only."""

    # Alpaca-style rows (instruction/input/output) are rendered with this template; `{instruction}`
    # and `{input}` are filled in. Default: the Alpaca templates (with and without input).
    prompt_template: str | None = None

    args_class = "trl.SFTConfig"

    def formats(self) -> dict[str, tuple[str, ...]]:
        return SFT_FORMATS


PREFERENCE_FORMATS = {
    "pairwise": ("chosen", "rejected"),
    "pointwise": ("prompt", "response", "score"),
    "listwise": ("prompt", "responses"),
}
PROMPT_FORMATS = {"prompts": ("prompt",)}


@dataclass(kw_only=True)
class RewardSpec(TrainStageSpec):
    """Sequence-classification reward model (one score) trained with `trl.RewardTrainer` (Bradley-Terry)."""

    args_class = "trl.RewardConfig"

    def formats(self) -> dict[str, tuple[str, ...]]:
        return PREFERENCE_FORMATS


@dataclass(kw_only=True)
class DPOSpec(TrainStageSpec):
    """Direct preference optimisation with `trl.DPOTrainer` against a frozen reference.

    With `peft`, the reference is the same base with the adapter disabled (one copy of the
    weights); without it, TRL keeps a frozen copy of the starting model.
    """

    args_class = "trl.DPOConfig"

    def formats(self) -> dict[str, tuple[str, ...]]:
        return PREFERENCE_FORMATS


@dataclass(kw_only=True)
class RewardTermSpec:
    """One weighted reward term. Give exactly one of `reward_model` or `function`."""

    reward_model: str | None = None  # a reward stage, local folder or Hub id: its scalar score
    function: str | None = None  # built-in (exact_match, format) or `package.module:function`
    weight: float = 1.0

    def check(self) -> list[str]:
        if (self.reward_model is None) == (self.function is None):
            return ["each reward needs exactly one of `reward_model` or `function`"]
        return []


@dataclass(kw_only=True)
class GRPOSpec(TrainStageSpec):
    """Group-relative policy optimisation with `trl.GRPOTrainer` on prompts (with `answer` for rule rewards)."""

    rewards: list[RewardTermSpec]
    max_new_tokens_eval: int = 16  # greedy held-out accuracy before/after training, where rows have `answer`

    args_class = "trl.GRPOConfig"

    def refs(self) -> list[tuple[str, str]]:
        return super().refs() + [("rewards.reward_model", r.reward_model) for r in self.rewards if r.reward_model]

    def check(self) -> list[str]:
        from pipeline.rewards import check_function

        problems = [] if self.rewards else ["`rewards` must list at least one reward"]
        for i, term in enumerate(self.rewards):
            problems += [f"rewards[{i}]: {p}" for p in term.check()]
            if term.function:
                problems += [f"rewards[{i}].function: {p}" for p in check_function(term.function)]
        return problems

    def formats(self) -> dict[str, tuple[str, ...]]:
        return PROMPT_FORMATS


STAGE_SPECS: dict[str, type[StageSpec]] = {
    "tokenizer": TokenizerSpec,
    "pretrain": PretrainSpec,
    "sft": SFTSpec,
    "reward": RewardSpec,
    "dpo": DPOSpec,
    "grpo": GRPOSpec,
}
