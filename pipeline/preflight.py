"""Checks made before any training starts: the data every stage will read, and the output directory."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from pipeline.data import DataError, load_source, require_columns
from pipeline.recipe import Recipe, resolve_local

MIN_FREE_BYTES = 1 << 30


def check_data(recipe: Recipe, selected: list[str] | None = None) -> None:
    """Read every local dataset of the stages that will run; check JSON and columns. Hub data is checked at load."""
    names = {s.name for s in recipe.stages}
    for stage in recipe.stages:
        if selected is not None and stage.name not in selected:
            continue
        formats = stage.formats() if hasattr(stage, "formats") else None
        for key, spec in stage.data_specs():
            for source in list(spec.sources) + ([spec.eval] if spec.eval else []):
                if source.path in names or resolve_local(source.path, recipe.path) is None:
                    continue
                dataset = load_source(source, recipe_path=recipe.path)
                if formats:
                    require_columns(dataset, formats, f"stage '{stage.name}': {key} '{source.path}'")


def check_output_dir(run_dir: Path) -> None:
    """The run directory must be writable and its disk not nearly full."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=run_dir):
            pass
    except OSError as err:
        raise DataError(f"output directory {run_dir} is not writable: {err.strerror}") from None
    free = shutil.disk_usage(run_dir).free
    if free < MIN_FREE_BYTES:
        raise DataError(f"output directory {run_dir}: only {free / 2**20:.0f} MiB free on its disk; "
                        f"at least {MIN_FREE_BYTES / 2**20:.0f} MiB is needed for checkpoints")
