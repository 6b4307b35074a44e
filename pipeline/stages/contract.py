"""A stage type: its spec (the recipe keys and the traits in `pipeline.config.specs.StageSpec`) and the
function that runs it. Each module in `pipeline.stages` defines one, as `STAGE`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from pipeline.config.specs import StageSpec
from pipeline.stages.context import StageContext


@dataclass(frozen=True)
class StageType:
    name: str  # the recipe's `type:`
    spec: type[StageSpec]
    run: Callable[[StageSpec, StageContext], dict[str, float]]  # trains or measures; returns the stage's metrics
