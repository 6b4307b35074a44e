"""Checks a training stage runs on its tokenized data before the first step: rows cut or dropped for length,
prompts that cannot fit the context, and padding that length grouping would save. Each prints what it found
(main process only) and, where rows are lost, returns counts for the stage's metrics."""

from __future__ import annotations

from typing import Any, Callable

import torch
from accelerate import PartialState
from datasets import Dataset

from pipeline.data.loading import DataError
from pipeline.data.prompts import prompt_token_ids


def report(where: str, notes: list[str]) -> None:
    """Print once (on the main process) what will happen to over-long rows."""

    if notes:
        PartialState().print(f"{where}: " + "; ".join(notes), flush=True)

def check_sft_lengths(trainer, rows: tuple[int, int], where: str) -> dict[str, float]:
    """Count rows TRL cut at `max_length` and rows it dropped because their prompt alone fills it.

    TRL drops those rows silently (no completion token is left to learn from); here they are
    counted and reported, and a split left empty is an error. `rows`: (train, held-out)
    row counts before the trainer prepared them.
    """
    limit = trainer.args.max_length
    if limit is None or trainer.args.packing:
        return {}  # nothing cut, or rows packed into blocks: nothing per row to count
    return dropped_and_cut(trainer, rows, where, lambda data: sum(len(ids) >= limit for ids in data["input_ids"]),
                           "so no completion token is left to train on")


def check_kto_lengths(trainer, rows: tuple[int, int], where: str) -> dict[str, float]:
    """As `check_sft_lengths`, for TRL's KTOTrainer, which filters such rows out without a word too."""
    limit = trainer.args.max_length
    if limit is None:
        return {}
    return dropped_and_cut(trainer, rows, where, lambda data: sum(
        len(p) + len(c) > limit for p, c in zip(data["prompt_ids"], data["completion_ids"])), "which KTO drops")


def dropped_and_cut(trainer, rows: tuple[int, int], where: str, cut_rows: Callable[[Dataset], int],
                    dropped_because: str) -> dict[str, float]:
    """Per split, the rows the trainer dropped for their prompt's length (`rows` before it prepared them, its
    datasets after) and `cut_rows` of those left, counted and reported; a split left empty is an error."""
    limit, counts, notes = trainer.args.max_length, {}, []
    for split, raw, dataset in (("train", rows[0], trainer.train_dataset), ("eval", rows[1], trainer.eval_dataset)):
        if dataset is None:
            continue
        if len(dataset) == 0:
            raise DataError(f"{where}: all {raw} {'training' if split == 'train' else 'held-out'} rows have prompts "
                            f"of max_length={limit} tokens or more, {dropped_because}; raise args.max_length")
        dropped, cut = raw - len(dataset), cut_rows(dataset)
        counts.update({f"{split}_dropped_rows": float(dropped), f"{split}_truncated_rows": float(cut)})
        if dropped or cut:
            notes.append(f"{dropped} of {raw} {split} rows dropped (prompt alone fills max_length={limit}), "
                         f"{cut} cut at max_length")
    report(where, notes)
    return counts

def check_dpo_lengths(trainer, rows: tuple[int, int], where: str) -> dict[str, float]:
    """Count pairs longer than `max_length` (cut when batched), pairs whose whole prompt is cut away
    (`keep_end`), and pairs TRL dropped because their prompt alone fills it (`keep_start`)."""
    limit, mode, counts, notes = trainer.args.max_length, trainer.args.truncation_mode, {}, []
    if limit is None:
        return counts
    for split, raw, dataset in (("train", rows[0], trainer.train_dataset), ("eval", rows[1], trainer.eval_dataset)):
        if dataset is None:
            continue
        if split == "train" and len(dataset) == 0:
            raise DataError(f"{where}: all {raw} training pairs have prompts of max_length={limit} tokens or more "
                            f"(truncation_mode={mode} drops them); raise args.max_length")
        replies = [max(len(c), len(r)) for c, r in zip(dataset["chosen_ids"], dataset["rejected_ids"])]
        cut = sum(len(p) + n > limit for p, n in zip(dataset["prompt_ids"], replies))
        prompt_lost = sum(n >= limit for n in replies) if mode == "keep_end" else 0
        dropped = raw - len(dataset)
        counts.update({f"{split}_dropped_pairs": float(dropped), f"{split}_truncated_pairs": float(cut),
                       f"{split}_prompt_lost_pairs": float(prompt_lost)})
        if dropped or cut:
            notes.append(f"{cut} of {raw} {split} pairs longer than max_length={limit} are cut ({mode}), "
                         f"{prompt_lost} of them losing their whole prompt; {dropped} dropped")
    report(where, notes)
    return counts

PADDING_HINT = 1.3  # tokens held / real tokens in random batches above which a stage suggests length grouping

def check_padding(trainer, length_of: Callable[[dict[str, Any]], int], where: str) -> None:
    """Say so when batches drawn in random order would be mostly padding (PITFALLS #3: HH-RLHF pairs
    hold about 2x their tokens) and length grouping is off. Pairs count at their longer reply, so the
    figure is a lower bound there."""

    args, dataset = trainer.args, trainer.train_dataset
    if args.train_sampling_strategy != "random" or getattr(args, "packing", False) or not isinstance(dataset, Dataset):
        return
    size = args.per_device_train_batch_size
    if len(dataset) < 2 * size:
        return
    lengths = torch.tensor([length_of(row) for row in dataset], dtype=torch.float)
    order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(args.seed))
    batches = lengths[order[: len(order) // size * size]].view(-1, size)
    held = float(batches.max(dim=1).values.sum() * size / batches.sum())
    if held > PADDING_HINT:
        report(where, [f"in random order, batches of {size} rows would hold about {held:.2f}x their real tokens "
                       "(padding); `args: {train_sampling_strategy: group_by_length}` batches rows of similar "
                       "length (README, Performance)"])


def check_prompt_lengths(model_config, tokenizer, prompts: list[Any], new_tokens: int, where: str,
                         what: str = "training prompts", knob: str = "args.max_completion_length") -> None:
    """Prompts that cannot fit the model's context together with `new_tokens` generated tokens: an error, before
    the stage trains or generates.

    Neither `generate` nor TRL's GRPOTrainer (1.16) truncates prompts: past its context a model with learned
    positions fails mid-run with an index error, and one with rotary positions generates at positions it never
    trained on, silently (transformers only logs a reminder). `knob` names the setting that sets `new_tokens`.
    """
    context = getattr(model_config.get_text_config(), "max_position_embeddings", None)
    if context is None:
        return
    lengths = [len(prompt_token_ids(tokenizer, p)) for p in prompts]
    limit = context - new_tokens
    over = sum(n > limit for n in lengths)
    if over:
        raise DataError(f"{where}: {over} of {len(prompts)} {what} are longer than {limit} tokens "
                        f"(longest {max(lengths)}), so with {knob}={new_tokens} they do not fit the model's "
                        f"{context}-token context; shorten them or lower {knob}")
