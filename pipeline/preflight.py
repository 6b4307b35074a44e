"""Checks made before training: the data every stage will read, its tokenizer, lengths, and the output directory.

`check_data` and `check_output_dir` run before any stage trains. The length checks need the
tokenizer the stage trains with (often made by an earlier stage), so each stage calls them
once its trainer has prepared the data, before it trains.
"""

from __future__ import annotations

import functools
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from pipeline.data import DataError, load_source, require_columns
from pipeline.recipe import Recipe, StageSpec, resolve_local

MIN_FREE_BYTES = 1 << 30
# Columns that built-in rule rewards (pipeline.rewards) read from each training row.
REWARD_COLUMNS = {"exact_match": ("answer",)}


def check_data(recipe: Recipe, selected: list[str] | None = None) -> None:
    """Read every local dataset of the stages that will run: JSON, the columns the stage needs, and a chat
    template for conversational rows. Hub data is checked when the stage loads it."""
    names = {s.name for s in recipe.stages}
    for stage in recipe.stages:
        if selected is not None and stage.name not in selected:
            continue
        formats = stage.formats() if hasattr(stage, "formats") else None
        for key, spec in stage.data_specs():
            sources = [(s, True) for s in spec.sources] + ([(spec.eval, False)] if spec.eval else [])
            for source, training in sources:
                if source.path in names or resolve_local(source.path, recipe.path) is None:
                    continue
                dataset = load_source(source, recipe_path=recipe.path)
                where = f"stage '{stage.name}': {key} '{source.path}'"
                if formats:
                    require_columns(dataset, formats, where)
                if training:
                    require_reward_columns(stage, dataset.column_names, where)
                if is_conversational(dataset[0]) and stage.type != "reward":  # reward: plain text without one
                    require_chat_template(recipe, stage, where)


def require_reward_columns(stage: StageSpec, columns: list[str], where: str) -> None:
    terms = stage.reward_terms() if hasattr(stage, "reward_terms") else getattr(stage, "rewards", None) or []
    for term in terms:
        missing = [c for c in REWARD_COLUMNS.get(term.function or "", ()) if c not in columns]
        if missing:
            raise DataError(f"{where}: the {term.function} reward needs column(s) {missing}; columns are {columns}")


def is_conversational(row: dict[str, Any]) -> bool:
    """Chat messages in any column TRL reads, or HH-RLHF transcripts (which become messages)."""
    from trl.data_utils import is_conversational as trl_is_conversational

    return trl_is_conversational(row) or any(isinstance(row.get(k), str) and "\n\nHuman:" in row[k]
                                             for k in ("chosen", "rejected"))


def tokenizer_origin(recipe: Recipe, stage: StageSpec) -> str | None:
    """The folder or Hub id a stage's tokenizer first comes from, following `tokenizer:`/`model:` through
    earlier stages; None when it comes from a `tokenizer` stage, which always sets a chat template."""
    stages = {s.name: s for s in recipe.stages}
    ref = getattr(stage, "tokenizer", None) or getattr(stage, "model", None)
    while isinstance(ref, str) and ref in stages:
        upstream = stages[ref]
        if upstream.type == "tokenizer":
            return None
        ref = getattr(upstream, "tokenizer", None) or getattr(upstream, "model", None)
    return ref if isinstance(ref, str) else None


def require_chat_template(recipe: Recipe, stage: StageSpec, where: str) -> None:
    """Conversational rows are rendered with the tokenizer's chat template: fail now, not when the stage starts."""
    origin = tokenizer_origin(recipe, stage)
    if origin is None:
        return
    local = resolve_local(origin, recipe.path)
    if has_chat_template(str(local or origin), local is None, getattr(stage, "trust_remote_code", False)) is False:
        raise DataError(f"{where}: the rows are chat messages, which need a chat template, and the tokenizer of "
                        f"'{origin}' has none; start from a model whose tokenizer has one, or give plain-text rows")


@functools.lru_cache(maxsize=None)
def has_chat_template(path: str, hub: bool, trust_remote_code: bool) -> bool | None:
    """Whether a tokenizer has a chat template; None if it cannot be loaded yet (a Hub tokenizer is read only
    from the local cache: preflight never downloads; the stage checks when it loads it)."""
    from transformers import AutoTokenizer

    from pipeline.modeling import gguf_location

    where = gguf_location(path) if path.endswith(".gguf") else {"pretrained_model_name_or_path": path}
    try:
        tokenizer = AutoTokenizer.from_pretrained(**where, local_files_only=hub, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        return None
    return tokenizer.chat_template is not None


def report(where: str, notes: list[str]) -> None:
    """Print once (on the main process) what will happen to over-long rows."""
    from accelerate import PartialState

    if notes:
        PartialState().print(f"{where}: " + "; ".join(notes), flush=True)


def check_sft_lengths(trainer, rows: tuple[int, int], where: str) -> dict[str, float]:
    """Count rows TRL cut at `max_length` and rows it dropped because their prompt alone fills it.

    TRL drops those rows silently (no completion token is left to learn from); here they are
    counted and reported, and a training set left empty is an error. `rows`: (train, held-out)
    row counts before the trainer prepared them.
    """
    limit, counts, notes = trainer.args.max_length, {}, []
    if limit is None or trainer.args.packing:
        return counts  # nothing cut, or rows packed into blocks: nothing per row to count
    for split, raw, dataset in (("train", rows[0], trainer.train_dataset), ("eval", rows[1], trainer.eval_dataset)):
        if dataset is None:
            continue
        dropped = raw - len(dataset)
        if split == "train" and len(dataset) == 0:
            raise DataError(f"{where}: all {raw} training rows have prompts of max_length={limit} tokens or more, "
                            "so no completion token is left to train on; raise args.max_length")
        cut = sum(len(ids) >= limit for ids in dataset["input_ids"])
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
    import torch
    from datasets import Dataset

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


def check_prompt_lengths(trainer, tokenizer, where: str) -> None:
    """Prompts that cannot fit the model's context together with `max_completion_length`: an error.

    TRL's GRPOTrainer (1.16) does not truncate prompts, so an over-long one would run past the
    model's positions during generation (an index error mid-training for learned positions).
    """
    from pipeline.generation import render_prompts

    context = getattr(trainer.model.config, "max_position_embeddings", None)
    prompts = list(trainer.train_dataset["prompt"])
    lengths = [len(ids) for ids in tokenizer(render_prompts(tokenizer, prompts), add_special_tokens=False)["input_ids"]]
    limit = None if context is None else context - trainer.args.max_completion_length
    over = sum(n > limit for n in lengths) if limit is not None else 0
    if over:
        raise DataError(f"{where}: {over} of {len(prompts)} training prompts are longer than {limit} tokens "
                        f"(longest {max(lengths)}), so with max_completion_length={trainer.args.max_completion_length} "
                        f"they do not fit the model's {context}-token context; shorten them or lower "
                        "args.max_completion_length")


def check_output_dir(run_dir: Path) -> None:
    """The run directory must be writable and its disk not nearly full."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=run_dir):
            pass
    except OSError as err:
        raise DataError(f"output directory {run_dir} is not writable: {err.strerror}") from None
    free = shutil.disk_usage(run_dir).free
    if free < MIN_FREE_BYTES:
        raise DataError(f"output directory {run_dir}: only {free / 2**20:.0f} MiB free on its disk; "
                        f"at least {MIN_FREE_BYTES / 2**20:.0f} MiB is needed for checkpoints")
