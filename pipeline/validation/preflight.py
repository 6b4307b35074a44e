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
from typing import Any

import torch
from transformers import AutoTokenizer
from trl.data_utils import is_conversational as trl_is_conversational

from pipeline.config.paths import output_dir_problem, resolve_local
from pipeline.config.recipe import Recipe
from pipeline.config.schema import RecipeError
from pipeline.config.specs import PREFERENCE_FORMATS, StageSpec
from pipeline.data.checks import Rows, identical_pairs, label_problems, row_problems, split_problem
from pipeline.data.formats import as_prompts
from pipeline.data.loading import DataError, load_source, require_columns, require_reward_columns, row_numbers
from pipeline.data.preferences import to_pairwise
from pipeline.models.chat_templates import CHATML_TEMPLATE, template_text
from pipeline.models.loading import gguf_location
from pipeline.models.tools import has_tool_turns, renders_tools
from pipeline.models.remote import RemoteScoringError, health
from pipeline.runtime.cpu import cpu_has_amx
from pipeline.runtime.distributed import zero_stage

MIN_FREE_BYTES = 1 << 30


def check_data(recipe: Recipe, selected: list[str] | None = None, hub: bool = False) -> list[str]:
    """Read every local dataset of the stages that will run, in file order: JSON, the columns and values the
    stage needs, chat messages and a chat template for them, preference pairs, and that the held-out split
    leaves rows to train on. With `hub` (`run`, before any stage trains), Hub datasets too: loaded (downloaded
    once into the datasets cache, as the stage would) and checked alike, so an unreachable or misspelled one
    fails the run before its first stage, not at its stage; `validate` leaves them to the run (it must pass
    offline, where Hub recipes are written).

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
                from_hub = local is None and hub and source.path not in names
                if local is None:
                    train_rows = None if training else train_rows
                    if not from_hub:
                        continue
                where = f"stage '{stage.name}': {key} '{source.path}'"
                try:
                    dataset = load_source(source, recipe_path=recipe.path)
                except DataError as err:  # the file itself: its message names it (and the line)
                    errors.append(f"stage '{stage.name}': {key}: {err}")
                    continue
                except Exception as err:  # only a Hub load gets here: its library's own reason, in one line
                    reason = " ".join(str(err).split())[:300]
                    errors.append(f"stage '{stage.name}': {key}: the Hub dataset '{source.path}' could not be loaded "
                                  f"({type(err).__name__}: {reason}); check the id and its name/split/data_dir, "
                                  "and the connection (with HF_HUB_OFFLINE=1 only cached datasets load)")
                    continue
                try:
                    found = check_source(recipe, stage, dataset, local, where, training)
                except DataError as err:
                    errors.append(str(err))
                    continue
                warnings += found
                if training and train_rows is not None:
                    train_rows += math.ceil(len(dataset) * source.weight)
            if train_rows and spec.eval is None and stage.holds_out and spec.eval_samples != 0:
                problem = split_problem(train_rows, spec.test_size)
                errors += [f"stage '{stage.name}': {key}.{problem}"] if problem else []
    if errors:
        raise DataError("\n".join(dict.fromkeys(errors)))
    return warnings


def check_source(recipe: Recipe, stage: StageSpec, dataset, local: Path | None, where: str,
                 training: bool) -> list[str]:
    """One source of a stage (`local`: its file or folder; None for Hub data): raises a DataError for rows it
    cannot use; returns warnings."""

    formats = stage.formats() or None
    data_format = require_columns(dataset, formats, where) if formats else None
    if training:
        require_reward_columns(stage.reward_terms(), dataset.column_names, where)
    kind, numbers = (row_numbers(local if local.is_file() else local / "data.jsonl", len(dataset)) if local
                     else ("row", list(range(1, len(dataset) + 1))))
    rows = Rows(where, kind, numbers)
    columns = formats[data_format] if formats else ()
    warnings: list[str] = []
    if stage.preference_data and data_format in PREFERENCE_FORMATS:  # pipeline.data.preferences' formats
        columns += ("prompt",) if "prompt" not in columns else ()  # optional in pairwise rows, checked where given
        problems = row_problems(dataset, columns, rows)
        if not problems and data_format == "pairwise":
            problems, warnings = identical_pairs(dataset, rows)
        if not problems:  # what remains is the conversion's own (HH-RLHF transcripts, scores, message splits)
            to_pairwise(dataset, where, rows.one)
    else:
        problems = row_problems(dataset, columns, rows, sft_messages=data_format == "messages")
        if not problems and "label" in columns:  # unpaired rows (KTO)
            problems = label_problems(dataset, rows)
        if not problems and data_format == "hh-rlhf transcripts":  # SFT messages or prompts: the same parse
            as_prompts(dataset, where)
    if problems:
        raise DataError("\n".join(problems))
    if is_conversational(dataset[0]) and stage.chat_needs_template:
        require_chat_template(recipe, stage, where)
        problem = tool_template_problem(recipe, stage.tokenizer_ref(), stage.trust_remote_code,
                                        getattr(stage, "chat_template", None)) if has_tool_turns(dataset) else None
        if problem:
            raise DataError(f"{where}: the rows call tools, but {problem}")
    return warnings


def check_launch(recipe: Recipe, selected: list[str] | None = None) -> None:
    """Stages this launch cannot run, refused before any stage trains. The launch is read from what
    `accelerate launch` hands each process, so `validate` says so too when started by the same launcher.
    (A stage type's trainer refuses too, but only when the stage starts, after every earlier stage has trained.)"""

    if zero_stage() != 3:
        return
    problems = [f"{recipe.path}: stage '{stage.name}': type {stage.type} cannot run under DeepSpeed ZeRO-3: "
                f"{stage.zero3_unsupported}; launch it with accelerate_configs/deepspeed_zero2.yaml or "
                f"multi_gpu.yaml (--stages {stage.name} runs it alone)"
                for stage in recipe.stages
                if stage.zero3_unsupported and (selected is None or stage.name in selected)]
    if problems:
        raise RecipeError(problems)


def setting_warnings(recipe: Recipe) -> list[str]:
    """Settings that run but work against what the recipe wants: bf16 where it crawls, RL sampling from another
    distribution than the one it trains."""
    return precision_warnings(recipe) + truncated_sampling_warnings(recipe)


# (setting, its values that leave the distribution whole)
SAMPLING_CUTS = (("top_p", (None, 1, 1.0)), ("top_k", (None, 0)), ("min_p", (None, 0, 0.0)))


def truncated_sampling_warnings(recipe: Recipe) -> list[str]:
    """Stages that learn from their own samples (grpo, rloo, ppo) drawing them from a cut distribution (top_p < 1,
    top_k, min_p) yet scoring them, in the loss, its importance ratio and the KL, under the whole one at
    `temperature`, as TRL's trainers and the ppo stage do: tokens the cut leaves out are never drawn, so never
    reinforced or penalised, and the updates are off the policy that sampled."""
    warnings = []
    for stage in recipe.stages:
        if not stage.learns_from_own_samples:
            continue
        args = recipe.stage_args(stage)
        cuts = [f"{name}: {args[name]}" for name, whole in SAMPLING_CUTS if args.get(name) not in whole]
        if cuts:
            warnings.append(f"{recipe.path}: stage '{stage.name}': {', '.join(cuts)} draws rollouts from a cut "
                            "distribution, while the loss, its ratio and the KL score each token under the whole "
                            "one: the updates are off the policy that sampled, and what the cut leaves out is never "
                            "learned from (RL keeps top_p 1.0, top_k 0, min_p 0; `temperature` reshapes both alike)")
    return warnings


def precision_warnings(recipe: Recipe) -> list[str]:
    """`precision: bf16` on a machine that runs bf16 far slower than fp32: a CPU without AMX (`cpu_has_amx`)."""
    if recipe.precision != "bf16" or torch.cuda.is_available() or cpu_has_amx() is not False:
        return []
    return [f"{recipe.path}: precision: bf16 on a CPU without AMX, where bf16 matrix products run far slower than "
            "fp32 (~200x on the CPUs this was measured on); `precision: auto` computes in fp32 on CPUs"]


def is_conversational(row: dict[str, Any]) -> bool:
    """Chat messages in any column TRL reads, or HH-RLHF transcripts (which become messages)."""

    return trl_is_conversational(row) or any(isinstance(row.get(k), str) and "\n\nHuman:" in row[k]
                                             for k in ("chosen", "rejected"))


def template_source(recipe: Recipe, ref: str | None) -> tuple[StageSpec | None, str | None]:
    """(the nearest stage on the way to a model reference's tokenizer that sets its chat template: one with
    `chat_template`, or a tokenizer stage; the folder or Hub id the tokenizer comes from, if any)."""
    stages = {s.name: s for s in recipe.stages}
    setter = None
    while ref in stages:
        stage = stages[ref]
        if setter is None and (getattr(stage, "chat_template", None) or stage.tokenizer_ref() is None):
            setter = stage
        ref = stage.tokenizer_ref()
    return setter, ref


def tool_template_problem(recipe: Recipe, ref: str | None, trust_remote_code: bool = False,
                          own_template: str | None = None) -> str | None:
    """Why the model `ref` cannot be shown tools, or None. Its chat template is `own_template` (a stage's own
    `chat_template`), else the nearest earlier stage's `chat_template`, else a tokenizer stage's (the template of
    what it loads, or its default), else that of the local folder or cached Hub tokenizer it comes from; it must
    render tools (`renders_tools`). A Hub tokenizer not cached yet is left to the stage."""
    setter, origin = template_source(recipe, ref)
    given = own_template or getattr(setter, "chat_template", None)
    if given:
        template = template_text(given)
        named = "the stage's chat_template" if own_template else f"stage '{setter.name}''s chat_template"
    else:
        source = getattr(setter, "load", None) if setter is not None else origin
        template, named = None, f"the chat template of '{source}'"
        if source is not None:
            local = resolve_local(source, recipe.path)
            try:
                template = chat_template_of(str(local or source), local is None, trust_remote_code)
            except LookupError:
                return None
        if template is None and setter is not None:  # the tokenizer stage writes its default where there is none
            template = CHATML_TEMPLATE
        if template is None:
            return f"'{source}' has no chat template, so the model would never see its tools; {TOOL_TEMPLATE_FIX}"
    if renders_tools(template):
        return None
    return (f"{named} does not render tools (a probe conversation's tool list, tool call or tool answer is missing "
            f"from it), so the model would never see its tools; {TOOL_TEMPLATE_FIX}")


TOOL_TEMPLATE_FIX = ("give it a chat template that renders them: `chat_template: chatml` (this pipeline's ChatML "
                     "with tool calls) on the sft or grpo stage that first trains it, or on a tokenizer stage")


def require_chat_template(recipe: Recipe, stage: StageSpec, where: str) -> None:
    """Conversational rows are rendered with the tokenizer's chat template: fail now, not when the stage starts. A
    template set on the way (a tokenizer stage, a stage's `chat_template`) is always there."""
    setter, origin = template_source(recipe, stage.tokenizer_ref())
    if getattr(stage, "chat_template", None) or setter is not None or origin is None:
        return
    local = resolve_local(origin, recipe.path)
    if has_chat_template(str(local or origin), local is None, stage.trust_remote_code) is False:
        raise DataError(f"{where}: the rows are chat messages, which need a chat template, and the tokenizer of "
                        f"'{origin}' has none; start from a model whose tokenizer has one, or give plain-text rows")


@functools.lru_cache(maxsize=None)
def chat_template_of(path: str, hub: bool, trust_remote_code: bool) -> str | None:
    """A tokenizer's chat template (None: it has none); LookupError if it cannot be loaded yet (a Hub tokenizer is
    read only from the local cache: preflight never downloads; the stage checks when it loads it)."""

    where = gguf_location(path) if path.endswith(".gguf") else {"pretrained_model_name_or_path": path}
    try:
        tokenizer = AutoTokenizer.from_pretrained(**where, local_files_only=hub, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise LookupError(path) from err
    return tokenizer.chat_template


def has_chat_template(path: str, hub: bool, trust_remote_code: bool) -> bool | None:
    """Whether a tokenizer has a chat template; None if it cannot be loaded yet (see `chat_template_of`)."""
    try:
        return chat_template_of(path, hub, trust_remote_code) is not None
    except LookupError:
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


def remote_problems(recipe: Recipe) -> list[str]:
    """`validate --check-remote`: each served reward a stage names answers `GET /health` (asked once per URL)."""
    problems, asked = [], set()
    for stage in recipe.stages:
        for term in stage.reward_terms():
            if term.reward_url and term.reward_url not in asked:
                asked.add(term.reward_url)
                try:
                    health(term.reward_url)
                except RemoteScoringError as err:
                    problems.append(f"{recipe.path}: stage '{stage.name}': reward_url: {err}")
    return problems
