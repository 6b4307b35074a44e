"""`python -m bench --rl-defaults SEEDS`: does RL learn with the project's defaults on work they were not tuned on?

For every seed, the recipe (default `recipes/facts.yaml`, the second task family) runs its stages up to the reward
model once; then its `ppo` stage runs once per (advantage estimator, LoRA or full fine-tuning), each in a fresh
process, with only the estimator (and, for full fine-tuning, no `peft`) changed: every other PPO setting is the
recipe's, i.e. the defaults. The table gives per run the sampled training reward (mean of the first and last
quarter of steps), held-out greedy accuracy and reward-model score before -> after, the held-out KL to the SFT
model, seconds per PPO step and the process's peak RSS. Runs already finished are read back (rerunning resumes);
`--rl-jobs N` runs N variants at once, each on `--threads` threads (default 1 then), so s/step is measured with N
processes sharing the machine.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import yaml

MODES = {"lora": True, "full": False}


def variant_stages(template: dict[str, Any], estimators: list[str], modes: list[str]) -> list[dict[str, Any]]:
    """The `ppo` stage once per (estimator, mode): `ppo-<estimator>-<mode>`."""
    stages = []
    for estimator in estimators:
        for mode in modes:
            stage = copy.deepcopy(template)
            stage["name"] = f"ppo-{estimator}-{mode}"
            stage["args"] = {**stage.get("args", {}), "advantage_estimator": estimator}
            if not MODES[mode]:
                stage.pop("peft", None)
            stages.append(stage)
    return stages


def write_recipe(data: dict[str, Any], stages: list[dict[str, Any]], seed: int, folder: Path) -> Path:
    """The recipe with these stages and seed, writing its run under `folder/run`."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump({**data, "seed": seed, "output_dir": str(folder / "run"), "stages": stages},
                                   sort_keys=False))
    return path


def run_stages(recipe: Path, stages: list[str], threads: int) -> int:
    """`pipeline run RECIPE --stages ...` in a fresh process; returns its peak RSS in MB."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "TQDM_DISABLE": "1"}
    code = ("import resource, sys; from pipeline.cli import main; code = main(sys.argv[1:]); "
            "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(code)")
    done = subprocess.run([sys.executable, "-c", code, "run", str(recipe), "--stages", ",".join(stages)], env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{recipe} --stages {','.join(stages)} failed:\n{done.stderr[-3000:]}")
    peak_kb = next(int(line.split()[1]) for line in done.stdout.splitlines() if line.startswith("PEAK_RSS_KB"))
    return peak_kb // 1024


def measure(run_dir: Path, stage: str) -> dict[str, Any]:
    metrics = json.loads((run_dir / stage / "result.json").read_text())["metrics"]
    history = json.loads((run_dir / stage / "log_history.json").read_text())
    seconds = json.loads((run_dir / stage / "result.json").read_text()).get("seconds", 0.0)
    reward = next(k.split("/", 1)[1] for k in metrics if k.startswith("eval_reward/"))
    return {"reward_first": metrics["train_reward_first"], "reward_last": metrics["train_reward_last"],
            "accuracy_before": metrics["initial_eval_accuracy"], "accuracy_after": metrics["eval_accuracy"],
            "rm_before": metrics[f"initial_eval_reward/{reward}"], "rm_after": metrics[f"eval_reward/{reward}"],
            "kl": metrics["eval_kl"], "s_per_step": seconds / max(len(history), 1),
            "peak_rss_mb": json.loads((run_dir / stage / "peak_rss_mb.json").read_text())}


def run_rl_defaults(recipe: Path, seeds: list[int], estimators: list[str], modes: list[str], threads: int, jobs: int,
                    work: Path, log: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    """{"<estimator>-<mode>-seed<N>": measurements} for every combination; `jobs` variants at once, each in its
    own run folder whose upstream stages are links to the seed's (so no two processes write one summary)."""
    data = yaml.safe_load(recipe.read_text())
    template = next(s for s in data["stages"] if s["type"] == "ppo")
    upstream = data["stages"][:[s["name"] for s in data["stages"]].index(template["name"])]
    variants = variant_stages(template, estimators, modes)

    def run_variant(seed: int, stage: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        folder = work / f"seed{seed}" / stage["name"]
        run_dir = folder / "run"
        if not (run_dir / stage["name"] / "peak_rss_mb.json").is_file():
            path = write_recipe(data, upstream + [stage], seed, folder)
            run_dir.mkdir(parents=True, exist_ok=True)
            for upstream_stage in upstream:
                link = run_dir / upstream_stage["name"]
                if not link.exists():
                    link.symlink_to(work.resolve() / f"seed{seed}" / "run" / upstream_stage["name"])
            log(f"seed {seed}: {stage['name']}")
            peak = run_stages(path, [stage["name"]], threads)
            (run_dir / stage["name"] / "peak_rss_mb.json").write_text(json.dumps(peak))
        return f"{stage['name'].removeprefix('ppo-')}-seed{seed}", measure(run_dir, stage["name"])

    for seed in seeds:
        log(f"seed {seed}: {', '.join(s['name'] for s in upstream)}")
        run_stages(write_recipe(data, upstream, seed, work / f"seed{seed}"), [s["name"] for s in upstream], threads * jobs)
    with ThreadPoolExecutor(jobs) as pool:
        return dict(pool.map(lambda job: run_variant(*job), [(seed, stage) for seed in seeds for stage in variants]))


def rl_defaults_table(results: dict[str, dict[str, Any]]) -> str:
    lines = ["| estimator | mode | seed | sampled reward first -> last | held-out accuracy before -> after | "
             "held-out RM score before -> after | KL to SFT | s / step | peak RSS MB |", "|---|---|---|---|---|---|---|---|---|"]
    for key, r in results.items():
        estimator, mode, seed = key.rsplit("-", 2)
        lines.append(f"| {estimator} | {mode} | {seed.removeprefix('seed')} | {r['reward_first']:.3f} -> "
                     f"{r['reward_last']:.3f} | {r['accuracy_before']:.3f} -> {r['accuracy_after']:.3f} | "
                     f"{r['rm_before']:.3f} -> {r['rm_after']:.3f} | {r['kl']:.3f} | {r['s_per_step']:.1f} | "
                     f"{r['peak_rss_mb'] or '-'} |")
    return "\n".join(lines)
