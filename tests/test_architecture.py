"""The package's structure, checked from its own source: layers, no import circles, one stage contract."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config.specs import StageSpec
from pipeline.stages import STAGE_TYPES

PACKAGE = Path(__file__).resolve().parents[1] / "pipeline"
# Lowest first: a module may import its own layer and the layers before it, never one after (README, Architecture).
LAYERS = ["config", "runtime", "data", "models", "training algorithms metrics", "stages", "validation", "outputs serving",
          "run", "cli __main__"]
LAYER = {folder: i for i, folders in enumerate(LAYERS) for folder in folders.split()}
# Optional dependencies, imported where they are used so that the package works without them. Any other import
# inside a function must say why on its line (`# lazy: ...`).
LAZY = {"deepspeed", "bitsandbytes", "vllm", "liger_kernel", "flash_attn", "gguf"}


def modules() -> dict[str, ast.Module]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = ast.parse(path.read_text())
    return found


def pipeline_imports(name: str, tree: ast.Module) -> set[str]:
    """The package's modules that `name` imports (a `from X import y` counts y when y is a module)."""
    known = modules_cache()
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "pipeline":
            for alias in node.names:
                target = f"{node.module}.{alias.name}"
                out.add(target if target in known else node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "pipeline")
    return out - {name}


_CACHE: dict[str, ast.Module] = {}


def modules_cache() -> dict[str, ast.Module]:
    if not _CACHE:
        _CACHE.update(modules())
    return _CACHE


def layer_of(module: str) -> int | None:
    parts = module.split(".")
    return LAYER.get(parts[1]) if len(parts) > 1 else None


def test_every_module_sits_in_a_layer_and_imports_only_its_own_or_lower_ones():
    problems = []
    for name, tree in modules_cache().items():
        mine = layer_of(name)
        if name == "pipeline":
            continue
        assert mine is not None, f"{name} is in no layer of {LAYERS}"
        for target in pipeline_imports(name, tree):
            theirs = layer_of(target)
            if theirs is not None and theirs > mine:
                problems.append(f"{name} imports {target}, a layer above it")
    assert not problems, "\n".join(problems)


def test_no_import_circles():
    graph = {name: pipeline_imports(name, tree) & modules_cache().keys() for name, tree in modules_cache().items()}
    # A module reached again from itself is a circle; packages' __init__ count as the modules they are.
    def reach(start: str) -> set[str]:
        seen, todo = set(), list(graph[start])
        while todo:
            node = todo.pop()
            if node not in seen:
                seen.add(node)
                todo += graph.get(node, ())
        return seen

    circles = sorted(name for name in graph if name in reach(name))
    assert not circles, f"modules on an import circle: {circles}"


def test_imports_are_at_the_top_except_optional_dependencies():
    inside = []
    for name, tree in modules_cache().items():
        as_file = PACKAGE.parent / (name.replace(".", "/") + ".py")
        source = (as_file if as_file.is_file() else as_file.with_suffix("") / "__init__.py").read_text().splitlines()
        for function in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            for node in ast.walk(function):
                if isinstance(node, ast.Import):
                    roots = {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom):
                    roots = {(node.module or "").split(".")[0]}
                else:
                    continue
                explained = source and "# lazy:" in source[node.lineno - 1]
                if not roots <= LAZY and not explained:
                    inside.append(f"{name}:{node.lineno} {ast.unparse(node)}")
    assert not inside, "imports inside functions:\n" + "\n".join(inside)


def test_every_stage_type_has_a_spec_module_and_a_run_module_of_its_name():
    spec_modules = sorted(n.removeprefix("pipeline.stages.specs.") for n in modules_cache()
                          if n.startswith("pipeline.stages.specs."))
    run_modules = sorted(n.removeprefix("pipeline.stages.") for n in modules_cache() if n.startswith("pipeline.stages.")
                         and n.count(".") == 2 and n.split(".")[-1] not in ("context", "contract", "specs"))
    assert sorted(STAGE_TYPES) == spec_modules == run_modules  # the type's name is its modules': one place to look
    for name, stage in STAGE_TYPES.items():
        assert issubclass(stage.spec, StageSpec) and dataclasses.is_dataclass(stage.spec)
        assert stage.spec.__module__ == f"pipeline.stages.specs.{name}" and stage.module == f"pipeline.stages.{name}"
        assert callable(getattr(importlib.import_module(stage.module), "run"))


HEAVY = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "deepspeed", "bitsandbytes")


def test_the_cli_and_the_recipe_vocabulary_import_no_training_library():
    """`pipeline --help`, `report`, `health` and a remembered `validate` answer in well under a second because
    reading, checking and reporting on a recipe never imports torch, transformers or TRL (`python -m bench
    --quickstart` times them): every stage type's spec, the health checks, the report and the CLI stay light."""
    light = ["pipeline.cli", "pipeline.stages", "pipeline.outputs.report", "pipeline.outputs.health",
             "pipeline.validation.verdicts", "pipeline.algorithms.ppo_trainer.config"]
    code = (f"import sys\nfor m in {light!r}: __import__(m)\n"
            f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PACKAGE.parent)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", f"imported: {done.stdout.strip()}"


@pytest.mark.parametrize("folder", ["config", "runtime", "data", "models", "training", "algorithms", "validation",
                                    "outputs", "run"])
def test_no_stage_type_is_named_outside_its_own_module(folder):
    """What differs between stage types is declared on their specs, so no code outside a stage's module
    compares a type name (`stage.type == "reward"`)."""
    named = []
    for name, tree in modules_cache().items():
        if name.split(".")[1:2] != [folder]:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare):
                literals = [c.value for c in [node.left, *node.comparators] if isinstance(c, ast.Constant)]
                literals += [e.value for c in node.comparators if isinstance(c, (ast.Tuple, ast.List, ast.Set))
                             for e in c.elts if isinstance(e, ast.Constant)]
                named += [f"{name}:{node.lineno} {ast.unparse(node)}" for v in literals if v in STAGE_TYPES]
    assert not named, "\n".join(named)


def test_importing_the_package_or_its_command_line_sets_nothing_up_and_imports_no_ml_library():
    """`pipeline --help` answers without torch, transformers, TRL or datasets; importing changes no environment
    variable and no warning filter (each command calls `prepare_process` itself)."""
    code = ("import os, sys, warnings; env, filters = dict(os.environ), list(warnings.filters); import pipeline.cli; "
            "heavy = sorted({'torch', 'transformers', 'trl', 'datasets', 'peft', 'accelerate'} & set(sys.modules)); "
            "print(heavy, dict(os.environ) == env, list(warnings.filters) == filters)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PACKAGE.parent)
    assert done.stdout.strip() == "[] True True", done.stdout + done.stderr
