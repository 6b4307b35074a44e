"""Checks against the model a stage will train, made without loading any weights.

A fresh `model:` config is built (as the pretrain stage will build it) so its keys and shapes are
checked by transformers itself; LoRA `target_modules` are matched against the module names of the
model the stage starts from, instantiated on the meta device (no memory, no weights). The model is
found through earlier stages to a fresh config, a local folder, or a Hub id already in the local
cache; one that is not there yet is left to the stage.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

import torch
from transformers import CONFIG_MAPPING, AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

from pipeline.config.paths import resolve_local
from pipeline.config.recipe import Recipe
from pipeline.config.schema import suggest
from pipeline.config.specs import StageSpec, TrainStageSpec

# A placeholder vocabulary for configs built before the tokenizer exists: shapes, not sizes, are checked.
PLACEHOLDER_TOKENS = {"vocab_size": 1024, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}


def fresh_config_problems(stage: TrainStageSpec) -> list[str]:
    """A fresh `model:` mapping's problems: unknown architecture or keys, values transformers rejects."""
    model = stage.model

    architecture = model.get("architecture")
    if architecture not in CONFIG_MAPPING:
        return [f"model.architecture: unknown model type '{architecture}'{suggest(str(architecture), CONFIG_MAPPING)}"
                " (any transformers model_type, e.g. llama, mixtral, qwen2)"]
    cls = CONFIG_MAPPING[architecture]
    if dataclasses.is_dataclass(cls):  # transformers 5 configs declare their fields; older ones take any key
        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = [k for k in model if k != "architecture" and k not in valid]
        if unknown:
            return [f"model.{k}: not a field of {cls.__name__}{suggest(k, valid)}" for k in unknown]
    try:
        _modules(stage.fresh_model_config(PLACEHOLDER_TOKENS), "causal-lm", False)
    except Exception as err:  # transformers' own message names the value (e.g. hidden size vs heads)
        return [f"model: {cls.__name__} rejects these values: {_first_line(err)}"]
    return []


def _first_line(err: Exception) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__  # a validator's last line holds its reason


_MODULES: dict[tuple[str, str], tuple[list[str], list[str]]] = {}  # stages often share a base: built once


def _modules(config, task: str, trust_remote_code: bool) -> tuple[list[str], list[str]]:
    """(every module name, the last name parts of its linear layers) of the model a config describes,
    built on the meta device: no memory and no weights."""

    key = (config.to_json_string(), task)
    if key not in _MODULES:
        if task == "seq-cls":
            config.num_labels = 1
        auto = AutoModelForSequenceClassification if task == "seq-cls" else AutoModelForCausalLM
        with torch.device("meta"):
            model = auto.from_config(config, trust_remote_code=trust_remote_code)
        names = [name for name, _ in model.named_modules() if name]
        linear = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                         if isinstance(module, torch.nn.Linear)})
        _MODULES[key] = (names, linear)
    return _MODULES[key]


def _origin_config(recipe: Recipe, ref: Any, trust_remote_code: bool):
    """The transformers config a model reference resolves to, or None where that needs a download."""

    stages = {s.name: s for s in recipe.stages}
    while isinstance(ref, str) and ref in stages:
        upstream = stages[ref]
        if isinstance(upstream, TrainStageSpec) and isinstance(upstream.model, dict):
            return _fresh(upstream)
        ref = upstream.model if isinstance(upstream, TrainStageSpec) else None
    if not isinstance(ref, str):  # a fresh config inside a stage that is not pretrain: nothing to follow
        return None
    local = resolve_local(ref, recipe.path)
    if local is not None and (local / "adapter_config.json").is_file():
        ref = json.loads((local / "adapter_config.json").read_text()).get("base_model_name_or_path")
        local = resolve_local(ref, recipe.path) if ref else None
    try:
        return AutoConfig.from_pretrained(str(local or ref), local_files_only=local is None,
                                          trust_remote_code=trust_remote_code)
    except Exception:  # not cached, gated, or not a model: the stage reports it when it loads the model
        return None


def _fresh(stage: StageSpec):
    try:
        return stage.fresh_model_config(PLACEHOLDER_TOKENS)
    except Exception:  # reported by fresh_config_problems on that stage
        return None


def lora_target_problems(recipe: Recipe, stage: TrainStageSpec) -> list[str]:
    """`peft.target_modules` entries that name no module of the model the stage trains (peft would raise
    mid-stage, or silently adapt fewer layers than asked when only some match)."""
    targets = stage.peft.target_modules
    if targets == "all-linear" or stage.peft.continues:
        return []
    trust = stage.trust_remote_code
    model = stage.model
    config = _fresh(stage) if isinstance(model, dict) else _origin_config(recipe, model, trust)
    if config is None:
        return []
    try:
        names, leaves = _modules(config, stage.model_task or "causal-lm", trust)
    except Exception:  # a config that does not build: reported where it is defined
        return []
    if isinstance(targets, str):  # peft matches a string as a regular expression over full module names
        if not any(re.fullmatch(targets, n) for n in names):
            return [f"peft.target_modules: the pattern '{targets}' matches no module of the model "
                    f"(its linear layers: {', '.join(leaves)})"]
        return []
    missing = [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in names)]
    return [f"peft.target_modules: '{t}' is not a module of the model{suggest(str(t), leaves)} "
            f"(its linear layers: {', '.join(leaves)})" for t in missing]


def model_problems(recipe: Recipe, stage: StageSpec) -> list[str]:
    """Every model check that applies to a stage."""
    if not isinstance(stage, TrainStageSpec):
        return []
    problems = fresh_config_problems(stage) if isinstance(stage.model, dict) and "architecture" in stage.model else []
    if not problems and stage.peft is not None:
        problems += lora_target_problems(recipe, stage)
    return problems
