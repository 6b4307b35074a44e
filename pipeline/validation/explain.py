"""The recipe vocabulary, documented where it is declared: `pipeline explain STAGE_TYPE` (every key of a stage type
and of its config class, with type, default and help) and `pipeline validate --explain` (each training stage's
resolved config, with where every value came from)."""

from __future__ import annotations

import dataclasses
import inspect
import io
import re
import tempfile
import typing
import tokenize
from enum import Enum

from pipeline.config.paths import import_object
from pipeline.config.recipe import Recipe, names_taken_from_defaults
from pipeline.config.schema import suggest
from pipeline.config.specs import StageSpec, TrainStageSpec
from pipeline.models.loading import recipe_precision
from pipeline.stages import STAGE_TYPES
from pipeline.training.trainers import make_config, pipeline_defaults

_FIELD = re.compile(r"^(\s+)(\w+)\s*:")
HIDDEN = ("name", "type", "output_dir")  # said by the recipe's structure, or chosen by the run


def declared_help(cls: type) -> dict[str, str]:
    """Each dataclass field's help: its `metadata["help"]` (TRL's and transformers' configs), else the comments
    on its line and on the comment lines right above it in the class's source (the project's own specs)."""
    found: dict[str, str] = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        found |= _commented_fields(klass)
    for f in dataclasses.fields(cls):
        if f.metadata.get("help"):
            found[f.name] = " ".join(str(f.metadata["help"]).split())
    return found


def _commented_fields(cls: type) -> dict[str, str]:
    """{field: its comments} from the source of `cls`'s own body (empty where the source is not available)."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    comments = {token.start[0]: token.string.lstrip("#").strip()
                for token in tokenize.generate_tokens(io.StringIO(source).readline) if token.type == tokenize.COMMENT}
    own = {f.name for f in dataclasses.fields(cls)}
    found, above, indent = {}, [], None
    for number, line in enumerate(source.splitlines(), start=1):
        if line.strip().startswith("#"):
            if not comments.get(number, "").startswith("---"):  # a section heading, not a field's help
                above.append(comments.get(number, ""))
            continue
        match = _FIELD.match(line)
        if match and match[2] in own and indent in (None, match[1]):
            indent = match[1]  # fields sit at the class body's indentation; deeper lines are code
            found[match[2]] = " ".join(above + [comments[number]] if number in comments else above)
        above = []
    return {name: text for name, text in found.items() if text}


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return repr(f.default)
    if f.default_factory is not dataclasses.MISSING:
        return repr(f.default_factory())
    return "required"


def _rows(cls: type, prefix: str = "", hide: tuple[str, ...] | set[str] = HIDDEN) -> list[str]:
    helps = declared_help(cls)
    return [f"  {prefix}{f.name}: {f.type} = {_default(f)}" + (f"\n      {helps[f.name]}" if f.name in helps else "")
            for f in dataclasses.fields(cls) if f.init and f.name not in hide]


def nested_specs(cls: type, seen: list[type] | None = None) -> list[type]:
    """The dataclasses a spec's keys take as values (`dataset: DatasetSpec`, `rewards: list[RewardTermSpec]`), and
    theirs in turn, each once, in the order the keys name them."""
    seen = [] if seen is None else seen
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init or f.name in HIDDEN:
            continue
        stack = [hints[f.name]]
        while stack:
            hint = stack.pop(0)
            if dataclasses.is_dataclass(hint) and hint not in seen:
                seen.append(hint)
                nested_specs(hint, seen)
            stack += typing.get_args(hint)
    return seen


def explain_stage_type(name: str) -> str:
    """Every key of stage type `name` and, under `args.`, every field of its config class."""
    if name not in STAGE_TYPES:
        raise KeyError(f"no stage type '{name}'{suggest(name, list(STAGE_TYPES))}; "
                       f"stage types: {', '.join(sorted(STAGE_TYPES))}")
    spec = STAGE_TYPES[name].spec
    lines = [f"stage type '{name}': {inspect.getdoc(spec).splitlines()[0]}", "", "keys:", *_rows(spec)]
    for block in nested_specs(spec):
        lines += ["", f"{block.__name__} ({inspect.getdoc(block).splitlines()[0]}):", *_rows(block, hide=())]
    if getattr(spec, "args_class", None):
        config = import_object(spec.args_class)
        stage_keys = {f.name for f in dataclasses.fields(spec)}  # set beside `args`, not in it
        lines += ["", f"args ({spec.args_class}; the pipeline's own defaults are shown by "
                      "`pipeline validate RECIPE --explain`):", *_rows(config, "args.", hide=HIDDEN + tuple(stage_keys))]
        if spec.shared_defaults is not None:
            lines += ["", f"a recipe's `defaults:` reach this stage only for: {', '.join(spec.shared_defaults)}"]
    return "\n".join(lines)


def explain_stage_config(recipe: Recipe, stage: StageSpec) -> str:
    """A training stage's resolved config: every field with its value and where it came from (the recipe's
    `args`, a stage key, `defaults`, the stage type, the pipeline on this hardware, or the library), and the
    `defaults` that do not reach it."""
    if not isinstance(stage, TrainStageSpec) or stage.args_class is None:
        return f"stage '{stage.name}' ({stage.type}): no config class"
    sources = recipe.stage_arg_sources(stage)
    cls = import_object(stage.args_class)
    with tempfile.TemporaryDirectory() as tmp, recipe_precision(recipe.precision):
        config = make_config(stage.args_class, recipe.stage_args(stage), output_dir=tmp, seed=recipe.seed)
        from_pipeline = pipeline_defaults(cls, recipe.seed)
    lines = [f"stage '{stage.name}' ({stage.type}, {cls.__name__}):"]
    for f in dataclasses.fields(cls):
        if not f.init or f.name in HIDDEN:
            continue
        source = sources[f.name][1] if f.name in sources else "pipeline" if f.name in from_pipeline else "library"
        value = getattr(config, f.name)
        lines.append(f"  {f.name} = {(value.value if isinstance(value, Enum) else value)!r}  [{source}]")
    taken = names_taken_from_defaults(stage)
    left = [key for key in recipe.defaults if key not in taken and key != "health"]
    if left:
        lines.append(f"  not taken from defaults: {', '.join(left)} (not fields of {cls.__name__} with the "
                     "same meaning)")
    return "\n".join(lines)


def explain_recipe(recipe: Recipe) -> str:
    return "\n\n".join(explain_stage_config(recipe, stage) for stage in recipe.stages
                       if isinstance(stage, TrainStageSpec) and stage.args_class)

