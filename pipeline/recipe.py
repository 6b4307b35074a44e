"""The recipe: YAML in, typed and fully checked dataclasses out (`load_recipe`).

A recipe is plain data. Every check that can be done without training happens here, so a
typo costs seconds, not a half-finished run: schema and types, stage references (a stage
may only use stages that run before it), local files, and every `args` / `peft` key
against the library class it configures.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from pipeline.schema import RecipeError, build, suggest

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


LOCAL_DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".jsonl.gz", ".json.gz", ".csv.gz")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


# ----------------------------------------------------------------------------- data specs
@dataclass(kw_only=True)
class SourceSpec:
    """One dataset source: a local file or a Hub dataset id."""

    path: str  # .jsonl/.json/.parquet/.csv file, a Hub dataset id, or the name of a data-producing stage
    name: str | None = None  # Hub dataset configuration
    split: str = "train"  # split to read from a Hub dataset or local file
    columns: dict[str, str] = field(default_factory=dict)  # rename columns {old: new}
    weight: float = 1.0  # in a mixture: fraction of this source's rows to take (>1 repeats rows)
    max_samples: int | None = None  # cap on rows read from this source


@dataclass(kw_only=True)
class DatasetSpec:
    """Training data (one source or a weighted mixture) and where the held-out split comes from."""

    sources: list[SourceSpec]
    test_size: float = 0.1  # held-out fraction (< 1) or number of rows (>= 1), split off with the recipe seed
    eval: SourceSpec | None = None  # explicit held-out source; replaces the split when given


# ---------------------------------------------------------------------------- stage specs
@dataclass(kw_only=True)
class StageSpec:
    """Keys every stage has."""

    name: str
    type: str

    ref_fields: ClassVar[tuple[str, ...]] = ()  # fields naming another stage, a local folder or a Hub id
    args_class: ClassVar[str | None] = None  # dotted path of the config class `args` are checked against

    def refs(self) -> list[tuple[str, str]]:
        """(field, value) for every model/tokenizer reference this stage makes."""
        out: list[tuple[str, str]] = []
        for name in self.ref_fields:
            value = getattr(self, name)
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, str):
                    out.append((name, item))
        return out

    def data_specs(self) -> list[tuple[str, DatasetSpec]]:
        """(field, spec) for every dataset this stage reads."""
        return [(f.name, getattr(self, f.name)) for f in dataclasses.fields(self)
                if isinstance(getattr(self, f.name), DatasetSpec)]


@dataclass(kw_only=True)
class QuantizationSpec:
    """bitsandbytes k-bit loading of the base weights (QLoRA when combined with `peft`)."""

    bits: int = 4  # 4 or 8
    quant_type: str = "nf4"  # 4-bit: nf4 or fp4
    double_quant: bool = True  # 4-bit: quantise the quantisation constants too
    compute_dtype: str | None = None  # default: bfloat16 on GPUs that support it, else float32


@dataclass(kw_only=True)
class PushSpec:
    """Upload a finished stage's output and a model card to the Hugging Face Hub (see `pipeline.hub`)."""

    repo_id: str  # owner/name; the token comes from HF_TOKEN or the saved login, never from the recipe
    private: bool = False  # create the repo as private (an existing repo keeps its visibility)
    revision: str | None = None  # branch to commit to, created if missing; default: the main branch
    merge_adapter: bool = False  # upload a LoRA adapter output merged into its base, as full weights

    def check(self) -> list[str]:
        problems = [] if HUB_ID.match(self.repo_id) else [f"repo_id: '{self.repo_id}' is not a Hub repo id (owner/name)"]
        return problems + ([] if self.revision != "" else ["revision: must be a branch name or left out"])


@dataclass(kw_only=True)
class TrainStageSpec(StageSpec):
    """Keys every model-training stage has."""

    model: str  # a previous stage's name, a local folder, or a Hub id
    dataset: DatasetSpec
    args: dict[str, Any] = field(default_factory=dict)  # fields of the stage's TRL/transformers config
    # peft.LoraConfig fields, plus `merge: true` to save merged weights and `adapter: stack|continue`
    # (what to do with an upstream LoRA adapter: merge it and add a new one, or train it further)
    peft: dict[str, Any] | None = None
    quantization: QuantizationSpec | None = None
    trust_remote_code: bool = False
    revision: str | None = None  # Hub revision of `model`
    push_to_hub: PushSpec | None = None  # publishing only: not part of the stage's fingerprint

    ref_fields = ("model",)


@dataclass
class Recipe:
    """A whole run: stages in the order they run."""

    name: str
    stages: list[StageSpec]
    seed: int = 42
    output_dir: str | None = None  # default: runs/<name>
    description: str | None = None
    defaults: dict[str, Any] = field(default_factory=dict)  # merged into every training stage's `args`
    path: Path | None = None  # the YAML file this came from
    raw: dict[str, Any] = field(default_factory=dict)  # the resolved recipe as data (overrides applied)

    def stage(self, name: str) -> StageSpec:
        return next(s for s in self.stages if s.name == name)

    def stage_args(self, stage: StageSpec) -> dict[str, Any]:
        """`defaults` that apply to this stage's config class, overridden by its own `args`."""
        if stage.args_class is None:
            return {}
        valid = config_fields(stage.args_class)
        merged = {k: v for k, v in self.defaults.items() if k in valid}
        merged.update(getattr(stage, "args", {}) or {})
        return merged


# ------------------------------------------------------------------------------ loading
def import_object(dotted: str) -> Any:
    """Import `package.module:attr` or `package.module.attr`."""
    module, _, attr = dotted.replace(":", ".").rpartition(".")
    return getattr(importlib.import_module(module), attr)


def callable_problems(dotted: str) -> list[str]:
    """Problems with a user function named `package.module:function`, for `pipeline validate`."""
    if ":" not in dotted:
        return [f"'{dotted}' is not a `package.module:function` path"]
    try:
        function = import_object(dotted)
    except (ImportError, AttributeError, ValueError) as err:
        return [f"cannot import '{dotted}': {err}"]
    return [] if callable(function) else [f"'{dotted}' is not callable"]


def config_fields(dotted: str) -> set[str]:
    return {f.name for f in dataclasses.fields(import_object(dotted)) if f.init}


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


def resolve_local(path: str, recipe_path: Path | None) -> Path | None:
    """A relative path is looked up in the working directory, then next to the recipe, then its parent."""
    candidate = Path(path).expanduser()
    if candidate.is_absolute():
        return candidate if candidate.exists() else None
    bases = [Path.cwd()]
    if recipe_path is not None:
        bases += [recipe_path.parent, recipe_path.parent.parent]
    for base in bases:
        if (base / candidate).exists():
            return (base / candidate).resolve()
    return None


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override, build and check a recipe; raise `RecipeError` listing every problem."""
    from pipeline.stages import STAGE_SPECS

    path = Path(path)
    if not path.is_file():
        raise RecipeError([f"{path}: recipe file not found"])
    try:
        data = parse_yaml(path.read_text())
    except yaml.YAMLError as err:
        raise RecipeError([f"{path}: not valid YAML: {err}"]) from err
    if not isinstance(data, dict):
        raise RecipeError([f"{path}: a recipe is a mapping with at least `name` and `stages`"])
    apply_overrides(data, overrides or [])
    raw = copy.deepcopy(data)

    errors: list[str] = []
    stages_data = data.get("stages")
    if not isinstance(stages_data, list) or not stages_data:
        errors.append(f"{path}: `stages` must be a non-empty list")
        stages_data = []
    stages: list[StageSpec] = []
    for i, item in enumerate(stages_data):
        label = f"stage {i}"
        if isinstance(item, dict) and isinstance(item.get("name"), str):
            label = f"stage '{item['name']}'"
        if not isinstance(item, dict) or "type" not in item:
            errors.append(f"{path}: {label}: each stage needs `name` and `type`")
            continue
        spec_cls = STAGE_SPECS.get(item["type"])
        if spec_cls is None:
            errors.append(f"{path}: {label}: unknown stage type '{item['type']}'"
                          f"{suggest(str(item['type']), STAGE_SPECS)} (one of {', '.join(STAGE_SPECS)})")
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

    top = {k: v for k, v in data.items() if k != "stages"}
    top_errors: list[str] = []
    recipe = build(Recipe, {**top, "stages": []}, "", top_errors)
    errors += [f"{path}: {e.lstrip('.: ')}" for e in top_errors]
    if recipe is None:
        raise RecipeError(errors or [f"{path}: invalid recipe"])
    recipe.stages, recipe.path, recipe.raw = stages, path, raw
    if not errors:
        errors += check_recipe(recipe)
    elif len(stages) == len(stages_data):
        # Report cross-stage problems too, so one pass lists everything; values that failed their
        # type check are None here and may trip a check, which then adds nothing.
        try:
            errors += check_recipe(recipe)
        except Exception:
            pass
    if errors:
        raise RecipeError(list(dict.fromkeys(errors)))
    return recipe


# ------------------------------------------------------------------------------- checks
def check_recipe(recipe: Recipe) -> list[str]:
    """Cross-field checks: names, references, files, library config keys and values."""
    errors: list[str] = []
    where = str(recipe.path)
    all_names = [s.name for s in recipe.stages]
    seen: list[str] = []
    for stage in recipe.stages:
        at = f"{where}: stage '{stage.name}'"
        if stage.name in seen:
            errors.append(f"{at}: duplicate stage name")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", stage.name):
            errors.append(f"{at}: name may only use letters, digits, '_', '-' and '.'")
        for key, ref in stage.refs():
            errors += [f"{at}: {key}: {e}" for e in _check_ref(ref, seen, all_names, recipe.path, key)]
        for key, spec in stage.data_specs():
            sources = list(spec.sources) + ([spec.eval] if spec.eval else [])
            for source in sources:
                errors += [f"{at}: {key}: {e}" for e in _check_source(source, seen, recipe.path)]
            if spec.test_size <= 0 and spec.eval is None:
                errors.append(f"{at}: {key}.test_size: must be > 0 (a held-out split is always measured)")
        errors += [f"{at}: {e}" for e in _check_library_keys(recipe, stage)]
        push = getattr(stage, "push_to_hub", None)
        errors += [f"{at}: push_to_hub.{e}" for e in (push.check() if push else [])]
        errors += [f"{at}: {e}" for e in stage_specific_errors(stage)]
        if not any(e.startswith(at) for e in errors):  # the model checks build configs: only from sound keys
            from pipeline.model_checks import model_problems

            errors += [f"{at}: {e}" for e in model_problems(recipe, stage)]
        seen.append(stage.name)

    training_fields: set[str] = set()
    for stage in recipe.stages:
        if stage.args_class:
            training_fields |= config_fields(stage.args_class)
    for key in recipe.defaults:
        if training_fields and key not in training_fields:
            errors.append(f"{where}: defaults.{key}: not a field of any stage's config{suggest(key, training_fields)}")
    return errors


def stage_specific_errors(stage: StageSpec) -> list[str]:
    check = getattr(stage, "check", None)
    return list(check()) if check else []


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
MODEL_FILES = ("config.json", "adapter_config.json")
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")


def _check_local_model(ref: str, local: Path, *, tokenizer_only: bool = False) -> list[str]:
    """Problems loading a local model reference: a folder of weights (or a LoRA adapter), or a GGUF file."""
    from importlib.util import find_spec

    if local.is_file():
        if local.suffix != ".gguf":
            return [f"'{ref}' is a file; give a model folder (with config.json) or a .gguf file"]
        with local.open("rb") as f:
            if f.read(4) != b"GGUF":
                return [f"'{ref}' is not a GGUF file (it does not start with the GGUF magic bytes)"]
        return [] if find_spec("gguf") else [f"'{ref}': reading a GGUF file needs the `gguf` package (pip install gguf)"]
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
    if resolve_local(source.path, recipe_path):
        return []
    if source.path.endswith(LOCAL_DATA_SUFFIXES) or source.path.startswith((".", "/", "~")):
        return [f"file '{source.path}' not found"]
    if not HUB_ID.match(source.path):
        return [f"'{source.path}' is not a local file, an earlier stage, or a Hub dataset id"]
    return []


def _check_arg_types(dotted: str, args: dict[str, Any]) -> list[str]:
    """Plain numbers and flags: the config classes do not check these types themselves."""
    import typing

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


def _check_library_keys(recipe: Recipe, stage: StageSpec) -> list[str]:
    """`args` keys against the stage's config class (then build it, to catch bad values); `peft` against LoraConfig."""
    errors: list[str] = []
    args = getattr(stage, "args", None)
    if stage.args_class and args is not None:
        valid = config_fields(stage.args_class)
        bad = [k for k in args if k not in valid]
        cls_name = stage.args_class.rpartition(".")[2]
        errors += [f"args.{k}: not a field of {cls_name}{suggest(k, valid)}" for k in bad]
        errors += [f"args.{e}" for e in _check_arg_types(stage.args_class, args)]
        if not bad:
            from pipeline.training import make_config

            from pipeline.arg_checks import value_problems

            with tempfile.TemporaryDirectory() as tmp:
                try:
                    config = make_config(stage.args_class, recipe.stage_args(stage), output_dir=tmp, seed=recipe.seed)
                except Exception as err:  # the library's own message says what is wrong with the value
                    errors.append(f"args: {cls_name} rejects these values: {err}")
                else:
                    errors += value_problems(config, recipe.stage_args(stage))
    peft = getattr(stage, "peft", None)
    if peft is not None:
        from pipeline.modeling import PEFT_EXTRA_KEYS

        valid = {f.name for f in dataclasses.fields(import_object("peft.LoraConfig")) if f.init} | set(PEFT_EXTRA_KEYS)
        errors += [f"peft.{k}: not a field of LoraConfig{suggest(k, valid)}" for k in peft if k not in valid]
        errors += _check_adapter_mode(recipe, stage, peft)
    quant = getattr(stage, "quantization", None)
    if quant is not None and quant.bits not in (4, 8):
        errors.append(f"quantization.bits: must be 4 or 8, got {quant.bits}")
    return errors


def _check_adapter_mode(recipe: Recipe, stage: StageSpec, peft: dict[str, Any]) -> list[str]:
    """`peft.adapter: continue` needs a stage type that supports it and an upstream LoRA adapter to continue."""
    from pipeline.modeling import ADAPTER_MODES, CONTINUE_STAGE_TYPES, PEFT_EXTRA_KEYS, is_adapter

    mode = peft.get("adapter", "stack")
    if mode not in ADAPTER_MODES:
        return [f"peft.adapter: must be one of {', '.join(ADAPTER_MODES)}, got {mode!r}"]
    if mode == "stack":
        return []
    if stage.type not in CONTINUE_STAGE_TYPES:
        return [f"peft.adapter: continue works in {', '.join(CONTINUE_STAGE_TYPES)} stages, not in {stage.type}"]
    errors = [f"peft.{k}: a continued adapter keeps its own LoraConfig; remove this key"
              for k in peft if k not in PEFT_EXTRA_KEYS]
    upstream = next((s for s in recipe.stages if s.name == stage.model), None)
    if upstream is not None:
        upstream_peft = getattr(upstream, "peft", None)
        if upstream_peft is None or upstream_peft.get("merge", False):
            errors.append(f"peft.adapter: continue needs `model` to be a LoRA adapter; stage '{upstream.name}' "
                          "saves full weights (give it `peft:` without `merge: true`)")
    else:
        local = resolve_local(stage.model, recipe.path)
        if local is not None and not is_adapter(local):
            errors.append(f"peft.adapter: continue needs `model` to be a LoRA adapter; {stage.model} holds full weights")
    return errors
