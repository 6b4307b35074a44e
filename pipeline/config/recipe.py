"""The recipe as data: YAML in (numbers as YAML 1.2 reads them), `--set` overrides applied, typed `Recipe` out.

`build_recipe` turns the mapping into dataclasses given the stage types' spec classes and collects every
schema error; `pipeline.validation.recipe_checks.load_recipe` adds the checks against files and libraries.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.config.health import HealthSpec, health_settings
from pipeline.config.paths import config_fields
from pipeline.config.schema import RecipeError, build, suggest, values_intact
from pipeline.config.specs import SourceSpec, StageSpec, TrainStageSpec


class RecipeLoader(yaml.SafeLoader):
    """YAML 1.1 reads `3e-4` (no dot) as a string; recipes mean a number, as YAML 1.2 and Python do."""


RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|\.[0-9_]+(?:[eE][-+]?[0-9]+)?"
               r"|[0-9][0-9_]*[eE][-+]?[0-9]+|\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=RecipeLoader)

PROMPT_RENDERINGS = ("auto", "raw")  # values of a recipe's `prompt_format`
PRECISIONS = ("auto", "fp32", "bf16")  # values of a recipe's `precision`


@dataclass
class Recipe:
    """A whole run: stages in the order they run."""

    name: str
    stages: list[StageSpec]
    seed: int = 42
    output_dir: str | None = None  # default: runs/<name>
    description: str | None = None
    defaults: dict[str, Any] = field(default_factory=dict)  # merged into every training stage's `args`
    # How plain-text prompts reach a model whose tokenizer has a chat template: `auto`, as a user turn unless the
    # model was trained on plain-text prompts (`pipeline.data.prompts`); `raw`, as plain text everywhere.
    prompt_format: str = "auto"
    # What models load and compute in: `auto`, bf16 on GPUs that support it and fp32 on CPUs; `bf16` or `fp32` as
    # said (`bf16` pays on CPUs with AMX: `pipeline.models.loading.use_bf16`).
    precision: str = "auto"
    path: Path | None = None  # the YAML file this came from
    raw: dict[str, Any] = field(default_factory=dict)  # the resolved recipe as data (overrides applied)

    def stage(self, name: str) -> StageSpec:
        return next(s for s in self.stages if s.name == name)

    def stage_health(self, stage: StageSpec) -> HealthSpec:
        """Run-health thresholds: `defaults.health`, overridden key by key by the stage's `health` (validated by
        `load_recipe`)."""
        return health_settings(self.defaults, getattr(stage, "health", {}), "health", [])

    def stage_args(self, stage: StageSpec) -> dict[str, Any]:
        """The stage's config values, lowest first: its type's `arg_defaults`, the `defaults` it shares
        (`shared_defaults`), its own `args`, then the stage keys that set config fields (`config_keys`)."""
        return {key: value for key, (value, _) in self.stage_arg_sources(stage).items()}

    def stage_arg_sources(self, stage: StageSpec) -> dict[str, tuple[Any, str]]:
        """`stage_args` with where each value came from: "stage type", "defaults", "args" or "stage key"."""
        if not isinstance(stage, TrainStageSpec) or stage.args_class is None:
            return {}
        layers = {"stage type": stage.arg_defaults,
                  "defaults": {k: v for k, v in self.defaults.items() if k in names_taken_from_defaults(stage)},
                  "args": stage.args, "stage key": stage.config_keys()}
        return {key: (value, source) for source, values in layers.items() for key, value in values.items()}


def names_taken_from_defaults(stage: TrainStageSpec) -> set[str]:
    """The names in a recipe's `defaults` this stage's config takes (see `TrainStageSpec.shared_defaults`)."""
    valid = config_fields(stage.args_class)
    return valid if stage.shared_defaults is None else valid & set(stage.shared_defaults)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> None:
    """Apply `--set dotted.key=value` (value parsed as YAML); `stages.NAME.key` finds a stage by name."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise RecipeError([f"--set {item}: expected dotted.key=value"])
        value = parse_yaml(text)
        parts = key.split(".")
        node: Any = data
        for i, part in enumerate(parts[:-1]):
            if isinstance(node, list):
                matches = [s for s in node if isinstance(s, dict) and s.get("name") == part]
                if matches:
                    node = matches[0]
                elif part.isdigit() and int(part) < len(node):
                    node = node[int(part)]
                else:
                    names = [s.get("name", "") for s in node if isinstance(s, dict)]
                    raise RecipeError([f"--set {key}: no stage '{part}'{suggest(part, names)}"])
            else:
                node = node.setdefault(part, {})
                if not isinstance(node, (dict, list)):
                    raise RecipeError([f"--set {key}: '{'.'.join(parts[:i + 1])}' is not a mapping"])
        node[parts[-1]] = value

def _normalise_dataset(value: Any) -> Any:
    """Shorthands: `dataset: file.jsonl`, `dataset: {path: ..., split: ...}` (one source), `eval: file.jsonl`."""
    if isinstance(value, str):
        return {"sources": [{"path": value}]}
    if isinstance(value, list):
        return {"sources": value}
    if not isinstance(value, dict):
        return value
    value = dict(value)
    if "sources" not in value and "path" in value:
        source_keys = {f.name for f in dataclasses.fields(SourceSpec)}
        value["sources"] = [{k: value.pop(k) for k in list(value) if k in source_keys}]
    if isinstance(value.get("eval"), str):
        value["eval"] = {"path": value["eval"]}
    return value

def _normalise_model(value: Any) -> Any:
    """`model: {path: FOLDER_OR_HUB_ID, gguf_file: NAME.gguf}` is the GGUF file `FOLDER_OR_HUB_ID/NAME.gguf`."""
    if isinstance(value, dict) and set(value) == {"path", "gguf_file"}:
        return f"{str(value['path']).rstrip('/')}/{value['gguf_file']}"
    return value

def read_recipe(path: Path, overrides: list[str]) -> dict[str, Any]:
    """The recipe file as a mapping, `--set` overrides applied."""
    if not path.is_file():
        raise RecipeError([f"{path}: recipe file not found"])
    try:
        data = parse_yaml(path.read_text())
    except yaml.YAMLError as err:
        raise RecipeError([f"{path}: not valid YAML: {err}"]) from err
    if not isinstance(data, dict):
        raise RecipeError([f"{path}: a recipe is a mapping with at least `name` and `stages`"])
    apply_overrides(data, overrides)
    return data


def build_recipe(path: Path, data: dict[str, Any], spec_classes: dict[str, type[StageSpec]]
                 ) -> tuple[Recipe, list[str], set[str] | None]:
    """(the recipe, its schema errors, the parts with errors) from a mapping and the stage types' specs.

    The parts with errors are the names of the stages with a value that failed its type check (None in the
    spec), with "" for the recipe's top level; None when some stage was not built at
    all, so that references to it cannot be told from typos. Raises `RecipeError` only when not even the top
    level builds.
    """
    raw = copy.deepcopy(data)
    errors: list[str] = []
    stages_data = data.get("stages")
    if not isinstance(stages_data, list) or not stages_data:
        errors.append(f"{path}: `stages` must be a non-empty list")
        stages_data = []
    stages: list[StageSpec] = []
    flawed: set[str] = set()
    for i, item in enumerate(stages_data):
        label = f"stage {i}"
        if isinstance(item, dict) and isinstance(item.get("name"), str):
            label = f"stage '{item['name']}'"
        if not isinstance(item, dict) or "type" not in item:
            errors.append(f"{path}: {label}: each stage needs `name` and `type`")
            continue
        spec_cls = spec_classes.get(item["type"])
        if spec_cls is None:
            errors.append(f"{path}: {label}: unknown stage type '{item['type']}'"
                          f"{suggest(str(item['type']), spec_classes)} (one of {', '.join(spec_classes)})")
            continue
        item = dict(item)
        for key, value in list(item.items()):
            if key == "dataset" or key.endswith("_dataset"):
                item[key] = _normalise_dataset(value)
            if key == "model":
                item[key] = _normalise_model(value)
        stage_errors: list[str] = []
        spec = build(spec_cls, item, "", stage_errors)
        errors += [f"{path}: {label}: {e.lstrip('.: ')}" for e in stage_errors]
        if spec is not None:
            stages.append(spec)
            if not values_intact(stage_errors):
                flawed.add(spec.name)

    top = {k: v for k, v in data.items() if k != "stages"}
    top_errors: list[str] = []
    recipe = build(Recipe, {**top, "stages": []}, "", top_errors)
    errors += [f"{path}: {e.lstrip('.: ')}" for e in top_errors]
    if recipe is None:
        raise RecipeError(errors or [f"{path}: invalid recipe"])
    recipe.stages, recipe.path, recipe.raw = stages, path, raw
    if not values_intact(top_errors):
        flawed.add("")
    return recipe, errors, flawed if len(stages) == len(stages_data) else None
