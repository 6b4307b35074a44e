"""Where recipe references point: local paths (relative to the working directory or the recipe), Hub ids,
and dotted `package.module:function` names."""

from __future__ import annotations

import dataclasses
import importlib
import re
import sys
from pathlib import Path
from typing import Any, Iterator

LOCAL_DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".jsonl.gz", ".json.gz", ".csv.gz")

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
FUNCTION_REF = re.compile(r"^([A-Za-z_][\w.]*):[A-Za-z_]\w*$")  # `package.module:function`, group 1 the module


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

def output_dir_problem(run_dir: Path) -> str | None:
    """Why `run_dir` can never be a run directory (it, or a folder above it, is a file), or None; creates nothing."""
    for path in [run_dir, *run_dir.parents]:
        if path.exists():
            if path.is_dir():
                return None
            what = f"{run_dir} is a file" if path == run_dir else f"{path}, above {run_dir}, is a file"
            return f"{what}, not a folder; give a folder path (`output_dir:` or --output-dir)"
    return None

# ------------------------------------------------------------------------------ loading
def import_object(dotted: str) -> Any:
    """Import `package.module:attr` or `package.module.attr`, from the Python path or the working directory (the
    `pipeline` command, unlike `python -m`, does not put the working directory on the path, and a recipe's reward
    functions and tools usually live beside it)."""
    module, _, attr = dotted.replace(":", ".").rpartition(".")
    try:
        found = importlib.import_module(module)
    except ModuleNotFoundError as err:
        here = str(Path.cwd())
        if err.name != module.split(".")[0] or here in sys.path:
            raise
        sys.path.append(here)
        found = importlib.import_module(module)
    return getattr(found, attr)

def strings(value: Any) -> Iterator[str]:
    """Every string in nested dicts and lists (a recipe's references, wherever they sit)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings(item)

def module_source(module: str) -> Path | None:
    """The file `import_object` would import `module` from, found without importing it (or its packages)."""
    parts = module.split(".")
    for entry in [Path.cwd(), *(Path(p) for p in sys.path if p)]:
        for candidate in (entry.joinpath(*parts).with_suffix(".py"), entry.joinpath(*parts, "__init__.py")):
            if candidate.is_file():
                return candidate
    return None

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
