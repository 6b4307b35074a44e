"""What a running stage is given: its folders, the recipe, and how to find other stages' outputs."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from datasets import Dataset

from pipeline.config.paths import resolve_local
from pipeline.config.recipe import Recipe
from pipeline.config.specs import DatasetSpec, StageSpec
from pipeline.data.loading import load_mixture, load_splits
from pipeline.training.health import HealthWatch


@dataclass
class StageContext:
    recipe: Recipe
    stage: StageSpec
    run_dir: Path
    is_main_process: bool = True

    @property
    def stage_dir(self) -> Path:
        return self.run_dir / self.stage.name

    @property
    def checkpoint_dir(self) -> Path:
        """Trainer checkpoints: kept across a killed run so the stage resumes."""
        return self.stage_dir / "checkpoints"

    @property
    def output_dir(self) -> Path:
        """Where the stage writes its model/tokenizer/data; renamed to `output` only on success."""
        return self.stage_dir / "output.partial"

    @cached_property
    def health(self) -> HealthWatch:
        """The stage's run-health watch (`pipeline.training.health`): lines printed by the main process only."""
        log = (lambda line: print(line, flush=True)) if self.is_main_process else (lambda line: None)
        return HealthWatch(self.stage.name, self.stage.health_checks, self.stage.health_names,
                           self.recipe.stage_health(self.stage), log)

    @property
    def seed(self) -> int:
        return self.recipe.seed

    def stage_output(self, name: str) -> Path | None:
        """The finished output folder of an earlier stage, or None if `name` is not a stage."""
        if any(s.name == name for s in self.recipe.stages):
            return self.run_dir / name / "output"
        return None

    def resolve(self, ref: str) -> str:
        """A model reference as something `from_pretrained` takes: stage output, local folder or Hub id."""
        output = self.stage_output(ref)
        if output is not None:
            return str(output)
        local = resolve_local(ref, self.recipe.path)
        return str(local) if local else ref

    def splits(self, spec: DatasetSpec) -> tuple[Dataset, Dataset]:
        return load_splits(spec, seed=self.seed, recipe_path=self.recipe.path, stage_outputs=self.stage_output)

    def rows(self, spec: DatasetSpec) -> Dataset:
        """Every row of a dataset spec, unsplit: for stages that only read (eval, generate)."""
        return load_mixture(spec, seed=self.seed, recipe_path=self.recipe.path, stage_outputs=self.stage_output)
