"""`python -m bench --alignment SEEDS`: does the quickstart's alignment story hold for every seed and thread count?

Runs the recipe once per (thread count, seed) with `--set seed=N`, each in its own run directory under the
work folder (kept: rerunning resumes, and two invocations with different `--alignment-threads` can share it),
then prints, per thread count, the mean and the worst seed of each claim: the reward model's held-out pair
accuracy, SFT's greedy / best-of-N / pass@k accuracy, each policy's greedy accuracy gain over SFT and its KL
to SFT, and the run's stage time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

# (row label, function of one run's {stage: metrics} and seconds, whether a larger value is better)
Claim = tuple[str, Callable[[dict[str, dict[str, float]], float], float], bool]


def run_once(recipe: Path, run_dir: Path, seed: int, threads: int) -> dict[str, Any]:
    """`pipeline run RECIPE --set seed=SEED` on `threads` CPU threads: each stage's metrics, its seconds
    (`stage_seconds`) and their sum (`seconds`)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    done = subprocess.run([sys.executable, "-m", "pipeline", "run", str(recipe), "--output-dir", str(run_dir),
                           "--set", f"seed={seed}"], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"seed {seed}, {threads} thread(s) failed:\n{done.stderr[-3000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    stage_seconds = {name: json.loads((run_dir / name / "result.json").read_text()).get("seconds", 0.0)
                     for name in summary["stages"] if (run_dir / name / "result.json").is_file()}
    return {"metrics": {name: stage["metrics"] for name, stage in summary["stages"].items()},
            "seconds": sum(stage_seconds.values()), "stage_seconds": stage_seconds}


def claims(runs: list[dict[str, Any]]) -> list[Claim]:
    """The rows of the table, from the metric names the first run's eval stage produced."""
    evaluated = next(m for m in runs[0]["metrics"].values() if any(k.startswith("accuracy/") for k in m))
    models = [k.split("/", 1)[1] for k in evaluated if k.startswith("accuracy/") and "@" not in k]
    baseline, policies = models[0], models[1:]
    extras = sorted(k.split("@", 1)[1] for k in evaluated if k.startswith(f"accuracy/{baseline}@"))

    def eval_metrics(stages: dict[str, dict[str, float]]) -> dict[str, float]:
        return next(m for m in stages.values() if f"accuracy/{baseline}" in m)

    rows: list[Claim] = []
    reward_stages = [name for name, m in runs[0]["metrics"].items() if "eval_accuracy" in m and "initial_eval_accuracy" in m
                     and "eval_mean_reward" in m]
    rows += [(f"{name}: held-out pair accuracy", lambda s, _, n=name: s[n]["eval_accuracy"], True) for name in reward_stages]
    rows.append((f"{baseline}: greedy accuracy", lambda s, _: eval_metrics(s)[f"accuracy/{baseline}"], True))
    rows += [(f"{baseline}: accuracy@{x}", lambda s, _, x=x: eval_metrics(s)[f"accuracy/{baseline}@{x}"], True)
             for x in extras]
    for p in policies:
        rows.append((f"{p}: greedy accuracy gain over {baseline}", lambda s, _, p=p: eval_metrics(s)[f"accuracy/{p}"]
                     - eval_metrics(s)[f"accuracy/{baseline}"], True))
        if f"kl/{p}" in evaluated:
            rows.append((f"{p}: KL to {baseline}", lambda s, _, p=p: eval_metrics(s)[f"kl/{p}"], False))
    rows.append(("stage time (s)", lambda _, seconds: seconds, False))
    return rows


def alignment_table(results: dict[int, dict[int, dict[str, Any]]]) -> str:
    """Markdown: one row per claim; per thread count the mean and the worst seed."""
    threads = sorted(results)
    seeds = sorted({seed for by_seed in results.values() for seed in by_seed})
    rows = claims([run for by_seed in results.values() for run in by_seed.values()])
    header = " | ".join(f"{t} thread{'s' if t > 1 else ''}: mean | worst" for t in threads)
    lines = [f"seeds {', '.join(map(str, seeds))}; worst = the lowest value, or the highest for KL and time", "",
             f"| claim | {header} |", "|---|" + "---|---|" * len(threads)]
    for label, value, larger_is_better in rows:
        cells = []
        for t in threads:
            values = [value(run["metrics"], run["seconds"]) for run in results[t].values()]
            worst = min(values) if larger_is_better else max(values)
            cells += [f"{sum(values) / len(values):.3f}", f"{worst:.3f}"]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_alignment(recipe: Path, seeds: list[int], threads: list[int], work: Path,
                  log: Callable[[str], None]) -> dict[int, dict[int, dict[str, Any]]]:
    """{threads: {seed: run}} for every pair, one run after another (runs already finished are read back)."""
    results: dict[int, dict[int, dict[str, Any]]] = {}
    for t in threads:
        for seed in seeds:
            log(f"seed {seed}, {t} thread(s): running {recipe} in {work / f'threads{t}-seed{seed}'}")
            results.setdefault(t, {})[seed] = run_once(recipe, work / f"threads{t}-seed{seed}", seed, t)
    return results
