"""`pretrain` stage type: its recipe keys."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.config.specs import TrainStageSpec
from pipeline.stages.contract import StageType


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
    headline_metrics = (("held-out loss", None, "eval_loss"),)

    def check(self) -> list[str]:
        problems = [] if self.block_size >= 1 else [f"block_size: must be >= 1, got {self.block_size}"]
        if isinstance(self.model, dict):
            problems += [] if self.tokenizer else ["a fresh `model:` config needs `tokenizer:`"]
            if "architecture" not in self.model:
                problems.append("model: a fresh config needs `architecture` (e.g. llama, mixtral)")
        return problems

    def formats(self) -> dict[str, tuple[str, ...]]:
        return {"text": (self.text_column,)}

    def fresh_model_config(self, tokens: dict[str, Any]) -> Any:
        return fresh_config(self.model, self.block_size, tokens) if isinstance(self.model, dict) else None

    def tokenizer_ref(self) -> str | None:
        return self.tokenizer or (self.model if isinstance(self.model, str) else None)

# Small Llama-style defaults (RMSNorm, RoPE, grouped-query attention, SwiGLU); a recipe overrides any.
FRESH_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=True),
    "mixtral": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=True),
}


def fresh_config(config_spec: dict[str, Any], block_size: int, tokens: dict[str, Any]):
    """The transformers config of a fresh model: `architecture` is any `model_type`; `tokens` gives
    `vocab_size` and the special token ids (the tokenizer's); the recipe's keys override everything."""

    from transformers import AutoConfig  # lazy: transformers only where a model is built, not to read a recipe

    options = dict(config_spec)
    architecture = options.pop("architecture")
    return AutoConfig.for_model(architecture, **{**FRESH_DEFAULTS.get(architecture, {}),
                                                 "max_position_embeddings": max(block_size, 512), **tokens, **options})


STAGE = StageType("pretrain", PretrainSpec, "pipeline.stages.pretrain")
