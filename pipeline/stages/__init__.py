"""The stage-type registry: every module of `pipeline.stages.specs` that defines `STAGE` (a `StageType`) is one.

Adding a stage type is adding two modules: its spec dataclass and `STAGE` in `pipeline/stages/specs/NAME.py`
(imported to read or check a recipe: keep it free of torch and TRL), and its `run(spec, ctx) -> metrics` in
`pipeline/stages/NAME.py` (imported when the stage runs).
"""

from __future__ import annotations

import importlib
import pkgutil

from pipeline.stages import specs
from pipeline.stages.contract import StageType

__all__ = ["STAGE_TYPES", "StageType"]


def _registered() -> dict[str, StageType]:
    found: dict[str, StageType] = {}
    for module in sorted(info.name for info in pkgutil.iter_modules(specs.__path__)):
        stage = getattr(importlib.import_module(f"{specs.__name__}.{module}"), "STAGE", None)
        if stage is None:
            continue
        if stage.name in found:
            raise RuntimeError(f"stage type '{stage.name}' is defined twice ({module} and {found[stage.name].module})")
        found[stage.name] = stage
    return found


STAGE_TYPES: dict[str, StageType] = _registered()
