"""A stage type: its spec (the recipe keys and the traits in `pipeline.config.specs.StageSpec`) and the module
whose `run(spec, ctx) -> metrics` runs it. Each module in `pipeline.stages.specs` defines one, as `STAGE`.

The spec and the run live apart so that reading, checking and reporting on a recipe never imports what
training needs (torch, transformers, TRL): the run module is imported when a stage of its type runs.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pipeline.config.specs import StageSpec

if TYPE_CHECKING:
    from pipeline.stages.context import StageContext


@dataclass(frozen=True)
class StageType:
    name: str  # the recipe's `type:`
    spec: type[StageSpec]
    module: str  # the module whose `run(spec, ctx)` trains or measures and returns the stage's metrics

    def run(self, spec: StageSpec, ctx: StageContext) -> dict[str, float]:
        return importlib.import_module(self.module).run(spec, ctx)
