"""Checks made before training: the data every stage will read, its tokenizer, lengths, and the output directory.

`check_data` and `check_output_dir` run before any stage trains. The length checks need the
tokenizer the stage trains with (often made by an earlier stage), so each stage calls them
once its trainer has prepared the data, before it trains.
"""

from __future__ import annotations

import functools
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from pipeline.data import DataError, load_source, require_columns, row_numbers
from pipeline.data_checks import Rows, identical_pairs, row_problems, split_problem
from pipeline.recipe import Recipe, StageSpec, resolve_local

MIN_FREE_BYTES = 1 << 30
# Columns that built-in rule rewards (pipeline.reward_functions) read from each training row.
REWARD_COLUMNS = {"exact_match": ("answer",)}
PREFERENCE_STAGE_TYPES = ("reward", "dpo", "kto")  # kto also takes unpaired rows
UNSPLIT_STAGE_TYPES = ("eval", "generate")  # they read every row; the others hold out `test_size`


def check_data(recipe: Recipe, selected: list[str] | None = None) -> list[str]:
    """Read every local dataset of the stages that will run, in file order: JSON, the columns and values the
    stage needs, chat messages and a chat template for them, preference pairs, and that the held-out split
    leaves rows to train on. Hub data is checked when the stage loads it.

    Raises a DataError listing every problem (one per line); returns warnings about data that trains but
    partly teaches nothing.
    """
    errors: list[str] = []
    warnings: list[str] = []
    names = {s.name for s in recipe.stages}
    for stage in recipe.stages:
        if selected is not None and stage.name not in selected:
            continue
        for key, spec in stage.data_specs():
            sources = [(s, True) for s in spec.sources] + ([(spec.eval, False)] if spec.eval else [])
            train_rows: int | None = 0  # None once a source is not a local file (its size is unknown here)
            for source, training in sources:
                local = None if source.path in names else resolve_local(source.path, recipe.path)
                if local is None:
                    train_rows = None if training else train_rows
                    continue
                where = f"stage '{stage.name}': {key} '{source.path}'"
                try:
                    dataset = load_source(source, recipe_path=recipe.path)
                except DataError as err:  # the file itself: its message names it (and the line)
                    errors.append(f"stage '{stage.name}': {key}: {err}")
                    continue
                try:
                    found = check_source(recipe, stage, dataset, local, where, training)
                except DataError as err:
                    errors.append(str(err))
                    continue
                warnings += found
                if training and train_rows is not None:
                    train_rows += math.ceil(len(dataset) * source.weight)
            if train_rows and spec.eval is None and stage.type not in UNSPLIT_STAGE_TYPES:
                problem = split_problem(train_rows, spec.test_size)
                errors += [f"stage '{stage.name}': {key}.{problem}"] if problem else []
    if errors:
        raise DataError("\n".join(dict.fromkeys(errors)))
    return warnings


def check_source(recipe: Recipe, stage: StageSpec, dataset, local: Path, where: str, training: bool) -> list[str]:
    """One local source of a stage: raises a DataError for rows it cannot use; returns warnings."""
    from pipeline.preferences import PREFERENCE_FORMATS, to_pairwise

    formats = stage.formats() if hasattr(stage, "formats") else None
    data_format = require_columns(dataset, formats, where) if formats else None
    if training:
        require_reward_columns(stage, dataset.column_names, where)
    kind, numbers = row_numbers(local if local.is_file() else local / "data.jsonl", len(dataset))
    rows = Rows(where, kind, numbers)
    columns = formats[data_format] if formats else ()
    warnings: list[str] = []
    if stage.type in PREFERENCE_STAGE_TYPES and data_format in PREFERENCE_FORMATS:  # pipeline.preferences' formats
        columns += ("prompt",) if "prompt" not in columns else ()  # optional in pairwise rows, checked where given
        problems = row_problems(dataset, columns, rows)
        if not problems and data_format == "pairwise":
            problems, warnings = identical_pairs(dataset, rows)
        if not problems:  # what remains is the conversion's own (HH-RLHF transcripts, scores, message splits)
            to_pairwise(dataset, where, rows.one)
    else:
        problems = row_problems(dataset, columns, rows, sft_messages=data_format == "messages")
    if problems:
        raise DataError("\n".join(problems))
    if is_conversational(dataset[0]) and stage.type != "reward":  # reward: plain text without one
        require_chat_template(recipe, stage, where)
    return warnings


# Stage types that cannot run under a launch's ZeRO stage, and why (the trainer itself refuses too, but only
# when the stage starts, after every earlier stage has trained).
ZERO3_UNSUPPORTED = {"ppo": "its rollouts would gather the sharded weights for every generated token"}


def check_launch(recipe: Recipe, selected: list[str] | None = None) -> None:
    """Stages this launch cannot run, refused before any stage trains. The launch is read from what
    `accelerate launch` hands each process, so `validate` says so too when started by the same launcher."""
    from pipeline.distributed import zero_stage
    from pipeline.schema import RecipeError

    if zero_stage() != 3:
        return
    problems = [f"{recipe.path}: stage '{stage.name}': type {stage.type} cannot run under DeepSpeed ZeRO-3: "
                f"{ZERO3_UNSUPPORTED[stage.type]}; launch it with accelerate_configs/deepspeed_zero2.yaml or "
                f"multi_gpu.yaml (--stages {stage.name} runs it alone)"
                for stage in recipe.stages
                if stage.type in ZERO3_UNSUPPORTED and (selected is None or stage.name in selected)]
    if problems:
        raise RecipeError(problems)


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
    from pipeline.prompts import prompt_token_ids

    context = getattr(trainer.model.config, "max_position_embeddings", None)
    prompts = list(trainer.train_dataset["prompt"])
    lengths = [len(prompt_token_ids(tokenizer, p)) for p in prompts]
    limit = None if context is None else context - trainer.args.max_completion_length
    over = sum(n > limit for n in lengths) if limit is not None else 0
    if over:
        raise DataError(f"{where}: {over} of {len(prompts)} training prompts are longer than {limit} tokens "
                        f"(longest {max(lengths)}), so with max_completion_length={trainer.args.max_completion_length} "
                        f"they do not fit the model's {context}-token context; shorten them or lower "
                        "args.max_completion_length")


def output_dir_problem(run_dir: Path) -> str | None:
    """Why `run_dir` can never be a run directory (it, or a folder above it, is a file), or None; creates nothing."""
    for path in [run_dir, *run_dir.parents]:
        if path.exists():
            if path.is_dir():
                return None
            what = f"{run_dir} is a file" if path == run_dir else f"{path}, above {run_dir}, is a file"
            return f"{what}, not a folder; give a folder path (`output_dir:` or --output-dir)"
    return None


def check_output_dir(run_dir: Path) -> None:
    """The run directory must be a writable folder and its disk not nearly full."""
    problem = output_dir_problem(run_dir)
    if problem and run_dir.is_file():
        raise DataError(f"output directory {problem}")
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
