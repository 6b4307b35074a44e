"""What a stage's result depends on beyond its recipe and inputs, for its fingerprint.

A rerun may skip a stage only if nothing that shapes its result changed: the project's code the stage
runs (its module and every `pipeline` module it imports, directly or inside functions), the versions of
the libraries it calls, and what the hardware resolved (precision, attention kernel, GPU fast paths,
which switch on by themselves when `vllm` is installed).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import json
from pathlib import Path
from typing import Any

from pipeline.config.paths import FUNCTION_REF, module_source, resolve_local, strings
from pipeline.config.recipe import Recipe
from pipeline.models.loading import attn_implementation, use_bf16
from pipeline.runtime.environment import file_digest, package_versions
from pipeline.stages import STAGE_TYPES
from pipeline.training.trainers import gpu_fast_paths

LIBRARIES = ("pipeline", "torch", "transformers", "trl", "peft", "accelerate", "datasets", "tokenizers", "bitsandbytes",
             "deepspeed", "safetensors", "evaluate", "gguf")


PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # the `pipeline` package (this module is pipeline/run/...)


def module_file(name: str) -> Path | None:
    """The source file of a `pipeline` module, found without importing it; None for a name that is not a module."""
    parts = name.split(".")[1:]
    candidates = [PACKAGE_ROOT.joinpath(*parts).with_suffix(".py"), PACKAGE_ROOT.joinpath(*parts, "__init__.py")]
    return next((path for path in candidates if parts and path.is_file()), PACKAGE_ROOT / "__init__.py" if not parts else None)


def imported_pipeline_modules(source: str, package: str) -> set[str]:
    """`pipeline.*` modules one module's source imports, at the top or inside functions."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "pipeline")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import: resolve against the importing module's package
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if base.split(".")[0] == "pipeline":
                found.add(base)
                found.update(f"{base}.{alias.name}" for alias in node.names)  # `from pipeline import x` may be a module
    return found


@functools.cache
def code_digest(module: str) -> str:
    """sha256 over the source of `module` and of every `pipeline` module it reaches through imports."""
    seen: dict[str, str] = {}
    pending = [module]
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        path = module_file(name)
        if path is None:  # a name imported from a module, not a module itself
            continue
        source = path.read_text()
        seen[name] = hashlib.sha256(source.encode()).hexdigest()
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        pending += sorted(imported_pipeline_modules(source, package) - seen.keys())
    return hashlib.sha256("".join(f"{k}:{v}\n" for k, v in sorted(seen.items())).encode()).hexdigest()


def library_versions() -> dict[str, str]:
    return package_versions(LIBRARIES)


def resolved_hardware() -> dict[str, Any]:
    """The choices made from the hardware rather than the recipe."""

    return {"bf16": use_bf16(), "attn_implementation": attn_implementation(), "fast_paths": gpu_fast_paths()}


def stage_identity(stage_type: str) -> dict[str, Any]:
    """Everything outside the recipe that a stage of this type's result depends on."""
    return {"code": code_digest(STAGE_TYPES[stage_type].module), "libraries": library_versions(),
            "hardware": resolved_hardware()}


def user_code(recipe: Recipe, stage) -> list[Path]:
    """Source files of the `module:function` references in a stage's spec and args (reward functions, answer
    extractors, tools, environments): editing one changes what the stage computes. The file named only, not
    what it imports in turn."""
    found = []
    for text in strings([dataclasses.asdict(stage), recipe.stage_args(stage)]):
        reference = FUNCTION_REF.match(text)
        source = module_source(reference.group(1)) if reference else None
        if source is not None:
            found.append(source.resolve())
    return found


def input_files(recipe: Recipe, stage) -> dict[str, str]:
    """Local files and folders a stage reads, its user code included, each with a digest of its content."""
    paths: list[str] = [ref for _, ref in stage.refs()]
    for _, spec in stage.data_specs():
        paths += [s.path for s in spec.sources] + ([spec.eval.path] if spec.eval else [])
    names = {s.name for s in recipe.stages}
    digests = {}
    for item in paths:
        local = None if item in names else resolve_local(item, recipe.path)
        if local is not None:
            digests[str(local)] = file_digest(local)
    for source in user_code(recipe, stage):
        digests[str(source)] = file_digest(source)
    return digests

def upstream_stages(recipe: Recipe, stage) -> list[str]:
    names = {s.name for s in recipe.stages}
    used = [ref for _, ref in stage.refs()]
    for _, spec in stage.data_specs():
        used += [s.path for s in spec.sources] + ([spec.eval.path] if spec.eval else [])
    return [u for u in dict.fromkeys(used) if u in names]

def fingerprint(recipe: Recipe, stage, upstream: dict[str, str]) -> str:
    """Hash of everything that determines a stage's result: its spec, args, seed, input files, upstream stages,
    and the code, library versions and hardware choices it runs with (`pipeline.run.stage_identity`)."""
    payload = {
        # publishing and judging the result, not inputs
        "spec": {k: v for k, v in dataclasses.asdict(stage).items() if k not in ("push_to_hub", "health")},
        "args": recipe.stage_args(stage), "seed": recipe.seed,
        "inputs": input_files(recipe, stage), "upstream": upstream, "runs_with": stage_identity(stage.type),
    }
    if recipe.prompt_format != "auto":  # only when set: the fingerprints of existing runs stay as they were
        payload["prompt_format"] = recipe.prompt_format
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]
