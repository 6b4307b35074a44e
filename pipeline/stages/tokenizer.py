"""`tokenizer` stage: train a byte-level BPE tokenizer with chat special tokens, or load one."""

from __future__ import annotations

from dataclasses import dataclass

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from pipeline.config.specs import DatasetSpec, StageSpec
from pipeline.data.loading import require_columns
from pipeline.models.loading import load_tokenizer
from pipeline.stages.context import StageContext
from pipeline.stages.contract import StageType


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

    ref_fields = ("load",)
    headline_metrics = (("chars/token", None, "eval_chars_per_token"),)

    def check(self) -> list[str]:
        if (self.dataset is None) == (self.load is None):
            return ["give exactly one of `dataset` (train a tokenizer) or `load` (use an existing one)"]
        problems = []
        if self.dataset is not None and self.vocab_size < MIN_VOCAB_SIZE:
            problems.append(f"vocab_size: must be at least {MIN_VOCAB_SIZE} (256 bytes and 4 special tokens, "
                            f"before any merge), got {self.vocab_size}")
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
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def train_bpe(texts, vocab_size: int, min_frequency: int):
    """A byte-level BPE `tokenizers.Tokenizer`: every byte is in the alphabet, so nothing is unknown."""

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
        special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def run(spec: TokenizerSpec, ctx: StageContext) -> dict[str, float]:
    if spec.load is not None:
        tokenizer = load_tokenizer(ctx.resolve(spec.load), trust_remote_code=spec.trust_remote_code)
        if spec.chat_template or tokenizer.chat_template is None:
            tokenizer.chat_template = spec.chat_template or CHATML_TEMPLATE
        held_out = None
    else:
        train, held_out = ctx.splits(spec.dataset)
        require_columns(train, spec.formats(), f"stage '{spec.name}'")
        texts = list(train[spec.text_column])
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=train_bpe(texts, spec.vocab_size, spec.min_frequency),
            bos_token=BOS, eos_token=EOS, pad_token=PAD, model_max_length=spec.model_max_length,
        )
        tokenizer.chat_template = spec.chat_template or CHATML_TEMPLATE
    if ctx.is_main_process:
        tokenizer.save_pretrained(ctx.output_dir)
    metrics = {"vocab_size": float(len(tokenizer))}
    if held_out is not None:
        # Compression on held-out text: characters per token (higher is better).
        texts = list(held_out[spec.text_column])
        tokens = sum(len(ids) for ids in tokenizer(texts)["input_ids"])
        metrics["eval_chars_per_token"] = sum(map(len, texts)) / max(tokens, 1)
    return metrics


STAGE = StageType("tokenizer", TokenizerSpec, run)
