"""Run health read back from a run directory: each training stage's findings from its log_history.json and
reported metrics, with the thresholds its recipe set (`pipeline health RUN_DIR`, the report, skipped stages).

Works on runs from before run health existed, as far as their logs go: a check whose quantity was not logged
does not apply.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.config.health import HealthSpec, health_settings
from pipeline.runtime.files import read_json
from pipeline.stages import STAGE_TYPES
from pipeline.training.health import Evidence, Finding, check, describe, verdict


def recipe_settings(recipe: dict[str, Any], name: str) -> HealthSpec:
    """A stage's thresholds from a resolved recipe as data (the manifest's `recipe`); the run validated them."""
    stage = next((s for s in recipe.get("stages") or [] if isinstance(s, dict) and s.get("name") == name), {})
    return health_settings(recipe.get("defaults") or {}, stage.get("health") or {}, "health", [])


def stage_findings(run_dir: Path, name: str, record: dict[str, Any], settings: HealthSpec) -> list[Finding] | None:
    """The findings of one stage of a run (its summary.json `record`), or None for a type that is not checked."""
    known = STAGE_TYPES.get(record["type"])
    if known is None or not known.spec.health_checks:
        return None
    history = read_json(Path(run_dir) / name / "log_history.json")
    evidence = Evidence(history if isinstance(history, list) else [], record.get("metrics") or {},
                        known.spec.health_names)
    return check(known.spec.health_checks, evidence, settings)


def run_health(run_dir: Path) -> dict[str, list[Finding]]:
    """{stage: findings} for every checked stage of a run that completed (or was skipped as complete), and, as
    recorded, for a stage that `health.fail_on` failed."""
    run_dir = Path(run_dir)
    summary = read_json(run_dir / "summary.json")
    if summary is None:
        raise FileNotFoundError(f"{run_dir}: no summary.json; is this a run directory?")
    recipe = (read_json(run_dir / "manifest.json") or {}).get("recipe") or {}
    found = {}
    for name, record in summary["stages"].items():
        if record["status"] in ("completed", "skipped"):
            findings = stage_findings(run_dir, name, record, recipe_settings(recipe, name))
            if findings is not None:
                found[name] = findings
        elif record["status"] == "failed" and record.get("health"):
            found[name] = record["health"]
    return found


def health_lines(found: dict[str, list[Finding]]) -> list[str]:
    """Each finding's line, then each stage's verdict, as the run printed them."""
    lines = [describe(name, f) for name, findings in found.items() for f in findings]
    return lines + [f"health: stage '{name}': {verdict(findings)}" for name, findings in found.items()]
