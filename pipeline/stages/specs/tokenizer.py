"""`tokenizer` stage type: its recipe keys."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config.specs import DatasetSpec, StageSpec
from pipeline.stages.contract import StageType


@dataclass(kw_only=True)
class TokenizerSpec(StageSpec):
    """Train a byte-level BPE tokenizer on a corpus, or load an existing one."""

    dataset: DatasetSpec | None = None  # corpus to train on
    load: str | None = None  # instead of training: a local folder or Hub id to load
    text_column: str = "text"
    vocab_size: int = 1024
    min_frequency: int = 2
    # every digit its own token (as Llama and SmolLM2 do): a number reads the same wherever it stands, so a model
    # can copy it (e.g. a tool's answer into its own) and do digit-wise arithmetic
    split_digits: bool = False
    # Jinja, or a name: "chatml" (the default: ChatML with tool calls) or "chatml_compact" (the same, a short tool list)
    chat_template: str | None = None
    model_max_length: int = 2048

    ref_fields = ("load",)
    headline_metrics = (("chars/token", None, "eval_chars_per_token"),)

    def check(self) -> list[str]:
        if (self.dataset is None) == (self.load is None):
            return ["give exactly one of `dataset` (train a tokenizer) or `load` (use an existing one)"]
        problems = []
        if self.dataset is not None and self.vocab_size < MIN_VOCAB_SIZE:
            problems.append(f"vocab_size: must be at least {MIN_VOCAB_SIZE} (256 bytes and 4 special tokens, "
                            f"before any merge), got {self.vocab_size}")
        if self.split_digits and self.load is not None:
            problems.append("split_digits: applies to a tokenizer this stage trains, not to one it loads")
        if self.min_frequency < 1:
            problems.append(f"min_frequency: must be >= 1, got {self.min_frequency}")
        if self.model_max_length < 1:
            problems.append(f"model_max_length: must be >= 1, got {self.model_max_length}")
        return problems

    def formats(self) -> dict[str, tuple[str, ...]]:
        return {"text": (self.text_column,)}

    def tokenizer_ref(self) -> str | None:
        return None  # the tokenizer is this stage's own output, which always has a chat template


BOS, EOS, PAD, IM_START = "<|endoftext|>", "<|im_end|>", "<|pad|>", "<|im_start|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, IM_START]
# Byte-level BPE starts from all 256 bytes plus the special tokens: a smaller `vocab_size` cannot be met
# (the trainer silently returns this many tokens and no merges).
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)


STAGE = StageType("tokenizer", TokenizerSpec, "pipeline.stages.tokenizer")
