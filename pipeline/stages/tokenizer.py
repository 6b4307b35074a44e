"""`tokenizer` stage: train a byte-level BPE tokenizer with chat special tokens, or load one."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from pipeline.data.loading import require_columns
from pipeline.models.loading import load_tokenizer
from pipeline.stages.context import StageContext
from pipeline.models.chat_templates import use_chat_template
from pipeline.stages.specs.tokenizer import BOS, EOS, PAD, SPECIAL_TOKENS, TokenizerSpec


def train_bpe(texts, vocab_size: int, min_frequency: int, split_digits: bool = False):
    """A byte-level BPE `tokenizers.Tokenizer`: every byte is in the alphabet, so nothing is unknown; with
    `split_digits`, no merge crosses a digit."""

    tokenizer = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level]) \
        if split_digits else byte_level
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
            use_chat_template(tokenizer, spec.chat_template or "chatml")
        held_out = None
    else:
        train, held_out = ctx.splits(spec.dataset)
        require_columns(train, spec.formats(), f"stage '{spec.name}'")
        texts = list(train[spec.text_column])
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=train_bpe(texts, spec.vocab_size, spec.min_frequency, spec.split_digits),
            bos_token=BOS, eos_token=EOS, pad_token=PAD, model_max_length=spec.model_max_length,
        )
        use_chat_template(tokenizer, spec.chat_template or "chatml")
    if ctx.is_main_process:
        tokenizer.save_pretrained(ctx.output_dir)
    metrics = {"vocab_size": float(len(tokenizer))}
    if held_out is not None:
        # Compression on held-out text: characters per token (higher is better).
        texts = list(held_out[spec.text_column])
        tokens = sum(len(ids) for ids in tokenizer(texts)["input_ids"])
        metrics["eval_chars_per_token"] = sum(map(len, texts)) / max(tokens, 1)
    return metrics
