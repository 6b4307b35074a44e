"""`load_recipe`: a recipe read, built and checked before anything trains.

Every check that can be done without training happens here, so a typo costs seconds, not a
half-finished run: schema and types, stage references (a stage may only use stages that run
before it), local files and models, and every `args` / `peft` key against the library class it configures.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import tempfile
import typing
from pathlib import Path
from typing import Any

import torch

from pipeline.config.health import health_settings
from pipeline.config.paths import HUB_ID, LOCAL_DATA_SUFFIXES, config_fields, import_object, resolve_local
from pipeline.config.recipe import PRECISIONS, PROMPT_RENDERINGS, Recipe, build_recipe, read_recipe
from pipeline.config.schema import RecipeError, suggest
from pipeline.config.specs import PeftSpec, SourceSpec, TrainStageSpec
from pipeline.models.loading import is_adapter, process_defaults, recipe_precision, use_bf16
from pipeline.stages import STAGE_TYPES
from pipeline.training.health import CHECKS
from pipeline.training.trainers import make_config
from pipeline.validation.arg_checks import value_problems
from pipeline.validation.model_checks import model_problems
from pipeline.validation.prompt_checks import tool_template_problems


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override, build and check a recipe; raise `RecipeError` listing every problem."""
    path = Path(path)
    recipe, errors, flawed = build_recipe(path, read_recipe(path, overrides or []),
                                          {name: stage.spec for name, stage in STAGE_TYPES.items()})
    if flawed is not None:  # every stage built: the cross-field problems are listed in the same pass
        errors += check_recipe(recipe, skip=flawed)
    if errors:
        raise RecipeError(list(dict.fromkeys(errors)))
    return recipe


def check_recipe(recipe: Recipe, skip: set[str] = frozenset()) -> list[str]:
    """Cross-field checks: names, references, files, library config keys and values.

    The stages named in `skip` (and with "", the top level) had schema errors, so some of their values are None:
    they are not checked further, but their names still count as defined.
    """
    errors: list[str] = []
    where = str(recipe.path)
    all_names = [s.name for s in recipe.stages]
    seen: list[str] = []
    for stage in recipe.stages:
        at = f"{where}: stage '{stage.name}'"
        if stage.name in skip:
            seen.append(stage.name)
            continue
        if stage.name in seen:
            errors.append(f"{at}: duplicate stage name")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", stage.name):
            errors.append(f"{at}: name may only use letters, digits, '_', '-' and '.'")
        for key, ref in stage.refs():
            errors += [f"{at}: {key}: {e}" for e in _check_ref(ref, seen, all_names, recipe.path, key)]
            errors += [f"{at}: {key}: {e}" for e in _role_problems(key, ref, stage, recipe)]
        for key, spec in stage.data_specs():
            sources = list(spec.sources) + ([spec.eval] if spec.eval else [])
            for source in sources:
                errors += [f"{at}: {key}: {e}" for e in _check_source(source, seen, recipe.path)]
            if spec.test_size <= 0 and spec.eval is None and spec.eval_samples != 0:
                errors.append(f"{at}: {key}.test_size: must be > 0 (or `eval_samples: 0` for no held-out split)")
            errors += [f"{at}: {key}.{e}" for e in eval_samples_problems(spec.eval_samples, stage.holds_out)]
        if isinstance(stage, TrainStageSpec):
            errors += [f"{at}: {e}" for e in training_key_problems(recipe, stage)]
            errors += [f"{at}: {e}" for e in health_problems(stage.health, stage.health_checks, stage.type)]
        errors += [f"{at}: {e}" for e in stage.check()]
        if not any(e.startswith(at) for e in errors):  # the model checks build configs: only from sound keys
            errors += [f"{at}: {e}" for e in model_problems(recipe, stage) + tool_template_problems(recipe, stage)]
        seen.append(stage.name)

    if "" in skip:
        return errors
    training_fields: set[str] = set()
    for stage in recipe.stages:
        if stage.args_class:
            training_fields |= config_fields(stage.args_class)
    errors += [f"{where}: defaults.{e}" for e in health_problems(recipe.defaults.get("health", {}), tuple(CHECKS))]
    for key in recipe.defaults:
        if key != "health" and training_fields and key not in training_fields:
            errors.append(f"{where}: defaults.{key}: not a field of any stage's config{suggest(key, training_fields)}")
    if recipe.prompt_format not in PROMPT_RENDERINGS:
        errors.append(f"{where}: prompt_format: must be one of {', '.join(PROMPT_RENDERINGS)}, got "
                      f"'{recipe.prompt_format}'{suggest(str(recipe.prompt_format), PROMPT_RENDERINGS)}")
    if recipe.precision not in PRECISIONS:
        errors.append(f"{where}: precision: must be one of {', '.join(PRECISIONS)}, got "
                      f"'{recipe.precision}'{suggest(str(recipe.precision), PRECISIONS)}")
    elif bf16_refused_by_launch(recipe.precision):
        errors.append(f"{where}: precision: bf16 under DeepSpeed needs a GPU: on a CPU, transformers trains in bf16 "
                      "only when told `use_cpu`, which a DeepSpeed launch cannot be; launch with --multi_gpu "
                      "(plain data parallel, bf16 works there) or use `precision: auto` (fp32 on CPUs)")
    return errors


def bf16_refused_by_launch(precision: str) -> bool:
    """bf16 in a DeepSpeed launch on CPUs (DS_ACCELERATOR=cpu): TrainingArguments refuses bf16 without a GPU unless
    `use_cpu`, and under DeepSpeed `process_defaults` must leave that off."""
    with recipe_precision(precision):
        return use_bf16() and not torch.cuda.is_available() and not process_defaults()["use_cpu"]

def health_problems(health: Any, checks: tuple[str, ...], stage_type: str | None = None) -> list[str]:
    """`health:` keys (thresholds of pipeline.config.health.HealthSpec) and `fail_on` names, with suggestions."""
    errors: list[str] = []
    settings = health_settings({}, health, "health", errors)
    for name in settings.fail_on if isinstance(settings.fail_on, list) else []:
        if name not in checks:
            which = f"a {stage_type} stage's findings" if stage_type else "findings"
            errors.append(f"health.fail_on: '{name}' is not one of {which} ({', '.join(checks)}){suggest(str(name), checks)}")
    return errors

def _check_ref(ref: str, earlier: list[str], all_names: list[str], recipe_path: Path | None,
               key: str = "model") -> list[str]:
    if ref in earlier:
        return []
    if ref in all_names:
        return [f"stage '{ref}' runs later; a stage can only use stages before it"]
    if ref.startswith((".", "/", "~")) or resolve_local(ref, recipe_path):
        local = resolve_local(ref, recipe_path)
        if local is None:
            return [f"local {'file' if ref.endswith('.gguf') else 'folder'} '{ref}' does not exist"]
        return _check_local_model(ref, local, tokenizer_only=key in TOKENIZER_FIELDS)
    hint = suggest(ref, earlier)
    if hint and "/" not in ref:
        return [f"unknown stage '{ref}'{hint}"]
    if ref.endswith(".gguf"):  # a GGUF file in a Hub repo: owner/name/file.gguf
        return [] if HUB_ID.match(ref.rpartition("/")[0]) else [f"'{ref}' is not a local .gguf file or one in a Hub repo"]
    if not HUB_ID.match(ref):
        return [f"'{ref}' is not an earlier stage, an existing local folder, or a Hub id"]
    return []

TOKENIZER_FIELDS = ("tokenizer", "load")  # reference fields that need only a tokenizer
SCORER_FIELDS = ("reward_model", "extra_reward_models", "rewards.reward_model")  # loaded as sequence classifiers
GENERATOR_FIELDS = ("models", "baseline", "reference")  # an eval stage generates with these


def _role_problems(key: str, ref: str, stage: Any, recipe: Recipe) -> list[str]:
    """A stage named where a reward model is read must train one, and an eval cannot generate with a reward
    model: caught here, not when the stage loads it after everything before it has trained."""
    upstream = next((s for s in recipe.stages if s.name == ref), None)
    if upstream is None or upstream is stage:
        return []
    if key in SCORER_FIELDS and upstream.model_task != "seq-cls":
        return [f"stage '{ref}' ({upstream.type}) is not a reward model; name a `reward` stage, a folder or a Hub id"]
    if stage.scores_models and key in GENERATOR_FIELDS and upstream.model_task == "seq-cls":
        return [f"stage '{ref}' is a reward model, which scores responses and cannot write them; name it as "
                "`reward_model` or `extra_reward_models`"]
    return []

MODEL_FILES = ("config.json", "adapter_config.json")

TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")

def _check_local_model(ref: str, local: Path, *, tokenizer_only: bool = False) -> list[str]:
    """Problems loading a local model reference: a folder of weights (or a LoRA adapter), or a GGUF file."""

    if local.is_file():
        if local.suffix != ".gguf":
            return [f"'{ref}' is a file; give a model folder (with config.json) or a .gguf file"]
        with local.open("rb") as f:
            if f.read(4) != b"GGUF":
                return [f"'{ref}' is not a GGUF file (it does not start with the GGUF magic bytes)"]
        return [] if importlib.util.find_spec("gguf") else [f"'{ref}': reading a GGUF file needs the `gguf` package (pip install gguf)"]
    expected = MODEL_FILES + (TOKENIZER_FILES if tokenizer_only else ())
    if not any((local / name).is_file() for name in expected):
        return [f"local folder '{ref}' holds no {'tokenizer' if tokenizer_only else 'model'} "
                f"(none of {', '.join(expected)}); for a GGUF file, name the .gguf file itself"]
    return []

def _check_source(source: SourceSpec, earlier: list[str], recipe_path: Path | None) -> list[str]:
    if source.path in earlier:
        return []
    if source.weight <= 0:
        return [f"{source.path}: weight must be > 0"]
    if source.max_samples is not None and source.max_samples < 1:
        return [f"{source.path}: max_samples must be at least 1 (`eval_samples: 0` trains on every row)"]
    if resolve_local(source.path, recipe_path):
        return [] if source.split == "train" else [
            f"{source.path}: `split: {source.split}` names a split of a Hub dataset; a local file is read whole"]
    if source.path.endswith(LOCAL_DATA_SUFFIXES) or source.path.startswith((".", "/", "~")):
        return [f"file '{source.path}' not found"]
    if not HUB_ID.match(source.path):
        return [f"'{source.path}' is not a local file, an earlier stage, or a Hub dataset id"]
    return []

def _check_arg_types(dotted: str, args: dict[str, Any]) -> list[str]:
    """Plain numbers and flags: the config classes do not check these types themselves."""

    try:
        hints = typing.get_type_hints(import_object(dotted))
    except Exception:  # unresolvable annotations in a library class: leave values to the class itself
        return []
    problems = []
    for key, value in args.items():
        hint = hints.get(key)
        allowed = set(typing.get_args(hint)) or {hint}
        if value is None or not allowed & {int, float, bool} or allowed - {int, float, bool, type(None)}:
            continue
        ok = (isinstance(value, bool) if allowed & {bool} == allowed - {type(None)}
              else isinstance(value, (int, float)) and not isinstance(value, bool)
              and (float in allowed or isinstance(value, int)))
        if not ok:
            names = " or ".join(sorted(t.__name__ for t in allowed if t is not type(None)))
            problems.append(f"{key}: expected {names}, got {type(value).__name__} {value!r}")
    return problems

def training_key_problems(recipe: Recipe, stage: TrainStageSpec) -> list[str]:
    """`args` keys against the stage's config class (then build it, to catch bad values); `peft` against
    LoraConfig; `quantization` and `push_to_hub`."""
    errors: list[str] = []
    args = stage.args
    if stage.args_class:
        valid = config_fields(stage.args_class)
        bad = [k for k in args if k not in valid]
        cls_name = stage.args_class.rpartition(".")[2]
        errors += [f"args.{k}: not a field of {cls_name}{suggest(k, valid)}" for k in bad]
        errors += [f"args.{e}" for e in _check_arg_types(stage.args_class, args)]
        if not bad and not bf16_refused_by_launch(recipe.precision):  # else said once for the recipe
            with tempfile.TemporaryDirectory() as tmp, recipe_precision(recipe.precision):
                try:
                    config = make_config(stage.args_class, recipe.stage_args(stage), output_dir=tmp, seed=recipe.seed)
                except Exception as err:  # the library's own message says what is wrong with the value
                    errors.append(f"args: {cls_name} rejects these values: {err}")
                else:
                    errors += value_problems(config, recipe.stage_args(stage))
    peft = stage.peft
    if peft is not None:
        valid = {f.name for f in dataclasses.fields(import_object("peft.LoraConfig")) if f.init}
        errors += [f"peft.{k}: not a field of LoraConfig{suggest(k, valid | {'adapter', 'merge'})}"
                   for k in peft.lora if k not in valid]
        errors += [f"peft.{e}" for e in peft.check()] + _check_adapter_mode(recipe, stage, peft)
    quant = stage.quantization
    if quant is not None and quant.bits not in (4, 8):
        errors.append(f"quantization.bits: must be 4 or 8, got {quant.bits}")
    return errors + [f"push_to_hub.{e}" for e in (stage.push_to_hub.check() if stage.push_to_hub else [])]

def _check_adapter_mode(recipe: Recipe, stage: TrainStageSpec, peft: PeftSpec) -> list[str]:
    """`peft.adapter: continue` needs a stage type that supports it and an upstream LoRA adapter to continue."""
    if not peft.continues:
        return []
    if not stage.continues_adapter:
        continuing = [name for name, known in STAGE_TYPES.items() if known.spec.continues_adapter]
        return [f"peft.adapter: continue works in {', '.join(continuing)} stages, not in {stage.type}"]
    errors = []
    upstream = next((s for s in recipe.stages if s.name == stage.model), None)
    if upstream is not None:
        upstream_peft = upstream.peft if isinstance(upstream, TrainStageSpec) else None
        if upstream_peft is None or upstream_peft.merges(False):
            errors.append(f"peft.adapter: continue needs `model` to be a LoRA adapter; stage '{upstream.name}' "
                          "saves full weights (give it `peft:` without `merge: true`)")
    else:
        local = resolve_local(stage.model, recipe.path)
        if local is not None and not is_adapter(local):
            errors.append(f"peft.adapter: continue needs `model` to be a LoRA adapter; {stage.model} holds full weights")
    return errors


def eval_samples_problems(value: Any, holds_out: bool) -> list[str]:
    """`eval_samples`: a count of held-out rows, for a stage that holds rows out."""
    if value is None:
        return []
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return [f"eval_samples: must be a whole number of rows >= 0 (0: no held-out evaluation), got {value!r}"]
    return [] if holds_out else ["eval_samples: this stage type evaluates every row it reads (cap them with "
                                 "`max_samples`)"]
