"""The stage-type registry: every module of this package that defines `STAGE` (a `StageType`) is one.

Adding a stage type is adding a module: its spec dataclass, its `run(spec, ctx) -> metrics`, and `STAGE`.
"""

from __future__ import annotations

import importlib
import pkgutil

from pipeline.stages.contract import StageType

__all__ = ["STAGE_TYPES", "StageType"]


def _registered() -> dict[str, StageType]:
    found: dict[str, StageType] = {}
    for module in sorted(info.name for info in pkgutil.iter_modules(__path__)):
        stage = getattr(importlib.import_module(f"{__name__}.{module}"), "STAGE", None)
        if stage is None:
            continue
        if stage.name in found:
            raise RuntimeError(f"stage type '{stage.name}' is defined twice ({module} and {found[stage.name].run.__module__})")
        found[stage.name] = stage
    return found


STAGE_TYPES: dict[str, StageType] = _registered()
