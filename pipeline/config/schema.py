"""Turn plain recipe data (dicts from YAML) into typed dataclasses, collecting every error.

Errors name the path of the offending key (``stages[2].args.learning_rat``) and suggest the
nearest valid key, so a typo is fixed from the message alone.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Union


class RecipeError(Exception):
    """One or more problems in a recipe, each a line naming the file, stage and key."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


# Names other libraries (or papers) use for a key, checked before spelling: `rank` is LoRA's `r`, and the
# KL coefficient is `kl_coef` in PPO but `beta` in TRL's DPO and GRPO configs.
SYNONYMS: dict[str, tuple[str, ...]] = {
    "rank": ("r",), "lora_rank": ("r",), "lora_r": ("r",), "alpha": ("lora_alpha",), "dropout": ("lora_dropout",),
    "kl_coef": ("beta",), "kl_coeff": ("beta", "kl_coef"), "init_kl_coef": ("kl_coef", "beta"), "beta": ("kl_coef",),
    "lr": ("learning_rate",), "epochs": ("num_train_epochs",), "num_epochs": ("num_train_epochs",),
    "batch_size": ("per_device_train_batch_size",), "train_batch_size": ("per_device_train_batch_size",),
    "max_seq_length": ("max_length",), "seq_length": ("max_length", "block_size"),
    "max_new_tokens": ("max_completion_length",), "human": ("user",), "bot": ("assistant",), "gpt": ("assistant",),
}


def suggest(key: str, valid: typing.Iterable[str]) -> str:
    """`"; did you mean 'x'?"` for a known synonym or the closest valid key, or an empty string."""
    valid = list(valid)
    close = [s for s in SYNONYMS.get(key, ()) if s in valid] or difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def _type_name(hint: Any) -> str:
    if hint is type(None):
        return "null"
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if origin is not None:
        return origin.__name__
    return getattr(hint, "__name__", str(hint))


def values_intact(errors: list[str]) -> bool:
    """Whether a build with these errors kept every value it was given: an unknown key is only left out, while
    a value that failed its type check became None."""
    return all(": unknown key '" in e for e in errors)


def build(cls: type, data: Any, where: str, errors: list[str]) -> Any:
    """Build dataclass ``cls`` from ``data``; append a message to ``errors`` per problem."""
    if not isinstance(data, dict):
        errors.append(f"{where}: expected a mapping, got {type(data).__name__}")
        return None
    if hasattr(cls, "fields_from"):  # a spec written flat in recipes (PeftSpec)
        data = cls.fields_from(data)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key not in fields:
            errors.append(f"{where}: unknown key '{key}'{suggest(str(key), fields)}")
            continue
        values[key] = convert(value, hints[key], f"{where}.{key}", errors)
    for name, field in fields.items():
        required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        if required and name not in data:
            errors.append(f"{where}: missing required key '{name}'")
    try:
        return cls(**values)
    except TypeError:  # a required key was missing: already reported
        return None


def convert(value: Any, hint: Any, where: str, errors: list[str]) -> Any:
    """Check ``value`` against a type hint, recursing into lists, dicts and dataclasses."""
    if hint is Any:
        return value
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        options = typing.get_args(hint)
        for option in options:  # first option that takes the value without errors wins
            trial: list[str] = []
            result = convert(value, option, where, trial)
            if not trial:
                return result
        dataclass_options = [o for o in options if dataclasses.is_dataclass(o)]
        if isinstance(value, dict) and len(dataclass_options) == 1:
            return convert(value, dataclass_options[0], where, errors)
        errors.append(f"{where}: expected {_type_name(hint)}, got {type(value).__name__} {value!r}")
        return None
    if origin is list:
        if not isinstance(value, list):
            errors.append(f"{where}: expected a list, got {type(value).__name__}")
            return None
        (item,) = typing.get_args(hint) or (Any,)
        return [convert(v, item, f"{where}[{i}]", errors) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            errors.append(f"{where}: expected a mapping, got {type(value).__name__}")
            return None
        _, item = typing.get_args(hint) or (str, Any)
        return {k: convert(v, item, f"{where}.{k}", errors) for k, v in value.items()}
    if dataclasses.is_dataclass(hint):
        return build(hint, value, where, errors)
    if hint is type(None):
        if value is not None:
            errors.append(f"{where}: expected null")
        return None
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float) and isinstance(value, bool):
        errors.append(f"{where}: expected {hint.__name__}, got bool {value!r}")
        return None
    if isinstance(hint, type) and not isinstance(value, hint):
        errors.append(f"{where}: expected {hint.__name__}, got {type(value).__name__} {value!r}")
        return None
    return value
