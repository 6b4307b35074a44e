"""Stage types: each module defines a spec dataclass (its recipe keys) and `run(spec, ctx) -> metrics`."""

from __future__ import annotations

import importlib
from typing import Callable

from pipeline.stages.specs import STAGE_SPECS

__all__ = ["STAGE_SPECS", "runner_for"]


def runner_for(stage_type: str) -> Callable:
    """The `run` function of a stage type (imported lazily: the ML libraries are slow to import)."""
    return importlib.import_module(f"pipeline.stages.{stage_type}").run
