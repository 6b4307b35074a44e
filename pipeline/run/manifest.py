"""`manifest.json`: everything needed to rerun a run and get the same numbers."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from accelerate import PartialState

from pipeline.models.loading import use_bf16
from pipeline.run.stage_identity import input_files
from pipeline.runtime.distributed import launch_record
from pipeline.runtime.environment import git_state, hardware, package_versions
from pipeline.runtime.files import read_json, write_json


def launch() -> dict[str, object]:
    """How the run was launched: process count and the launcher's settings (accelerate passes its config
    to each process as ACCELERATE_*/FSDP_* variables; the launch command itself is not visible here)."""

    settings = {k: v for k, v in sorted(os.environ.items()) if k.startswith(("ACCELERATE_", "FSDP_", "DS_"))}
    return {**launch_record(PartialState()), "environment": settings}


def launch_history(previous: dict | None, current: dict[str, object]) -> list[dict[str, object]]:
    """Every launch into a run directory, oldest first: the earlier manifest's list with this launch's entry
    (named by its `started` time) added or brought up to date. A manifest from before the history
    existed contributes its single `launch` record."""
    previous = previous or {}
    history = previous.get("launches")
    if history is None:
        history = [previous["launch"]] if "launch" in previous else []
    return [entry for entry in history if entry.get("started") != current["started"]] + [current]


def write_manifest(run_dir: Path, recipe, fingerprints: dict[str, str], timings: dict[str, float],
                   started: str) -> None:
    """Write manifest.json. `timings` are the stages this launch ran; `stage_seconds` also has those an earlier
    launch ran (skipped now), from their result.json. `launches` is the history of launches into the run
    directory, `launch` the latest."""

    inputs: dict[str, str] = {}
    for stage in recipe.stages:
        inputs.update(input_files(recipe, stage))
    where = recipe.path.resolve().parent if recipe.path else Path.cwd()
    previous = read_json(run_dir / "manifest.json") or {}
    seconds = {}  # of every stage whose result stands, whichever launch ran it
    for name, expected in fingerprints.items():
        result = read_json(run_dir / name / "result.json") or {}
        if result.get("fingerprint") == expected and "seconds" in result:
            seconds[name] = result["seconds"]
    current = {"started": started, "argv": sys.argv, **launch(), "stage_seconds": dict(timings)}
    write_json(run_dir / "manifest.json", {
        "recipe": recipe.raw, "recipe_path": str(recipe.path), "seed": recipe.seed,
        "argv": sys.argv, "packages": package_versions(), "git": git_state(where),
        "hardware": {**hardware(), "precision": "bf16" if use_bf16() else "fp32"},  # the recipe's `precision`, resolved
        "launch": current, "launches": launch_history(previous, current),
        "inputs": inputs, "stage_fingerprints": fingerprints, "stage_seconds": {**seconds, **timings},
    })
