"""`python -m bench --quickstart`: where a new user waits, measured as they would meet it.

- CLI start-up: wall seconds of `pipeline --help`, `pipeline validate recipes/quickstart.yaml` checked in full
  and with its verdict remembered, and, after the run, `pipeline health` and `pipeline report` of it, each in
  fresh processes (the best of three: start-up is what is measured, not the machine's other work);
- the quickstart: `pipeline run recipes/quickstart.yaml` from an empty run directory, its wall clock, each
  stage's seconds and share of it, and the efficacy the README claims (the reward model's held-out pair
  accuracy, each policy's greedy accuracy gain over SFT and its KL), read by the same rows as `--alignment`;
- beside them, what lets a figure from another machine be read against this one: the measured matmul peak
  and the load average before and after.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from bench.alignment import claims, run_once

BEFORE_RUN = {"pipeline --help": ["--help"],
              "pipeline validate (quickstart, checked in full)": ["validate", "--no-cache", "recipes/quickstart.yaml"],
              "pipeline validate (quickstart, again: verdict remembered)": ["validate", "recipes/quickstart.yaml"]}
AFTER_RUN = {"pipeline health (the run)": ["health", "{run}"], "pipeline report (the run)": ["report", "{run}"]}


def cli_seconds(repo: Path, threads: int, commands: dict[str, list[str]], run_dir: Path | None = None,
                repeats: int = 3) -> dict[str, float]:
    """The best wall seconds of each CLI command over `repeats` fresh processes (`{run}` is `run_dir`). The
    validate verdicts are remembered in a fresh folder, so the first remembered-verdict run checks in full."""
    best = {}
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PIPELINE_CACHE_DIR": cache}
        for label, args in commands.items():
            times = []
            for _ in range(repeats):
                started = time.perf_counter()
                subprocess.run([sys.executable, "-m", "pipeline", *(a.format(run=run_dir) for a in args)], cwd=repo,
                               env=env, check=True, capture_output=True)
                times.append(time.perf_counter() - started)
            best[label] = min(times)
    return best


def run_quickstart(repo: Path, run_dir: Path, threads: int, log: Callable[[str], None]) -> dict[str, Any]:
    """CLI start-up and one whole quickstart run from scratch (`run_dir` is emptied first)."""
    log("timing the CLI's start-up")
    startup = cli_seconds(repo, threads, BEFORE_RUN)
    shutil.rmtree(run_dir, ignore_errors=True)
    log(f"running recipes/quickstart.yaml into {run_dir} on {threads} thread(s)")
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    run = run_once(repo / "recipes" / "quickstart.yaml", run_dir, 42, threads)
    wall = time.perf_counter() - started
    load_after = os.getloadavg()[0]
    startup |= cli_seconds(repo, threads, AFTER_RUN, run_dir)
    return {"cli_seconds": startup, "wall_seconds": wall, "load_before": load_before,
            "load_after": load_after, **run}


def quickstart_table(result: dict[str, Any], peak: str) -> str:
    wall = result["wall_seconds"]
    lines = [peak, f"load average (1 min): {result['load_before']:.2f} before, {result['load_after']:.2f} after", "",
             "| CLI command | seconds |", "|---|---|"]
    lines += [f"| `{label}` | {seconds:.2f} |" for label, seconds in result["cli_seconds"].items()]
    lines += ["", f"quickstart wall clock: {wall:.0f} s (stages {result['seconds']:.0f} s; the rest is start-up "
              "and each stage's process)", "", "| stage | seconds | share |", "|---|---|---|"]
    lines += [f"| {name} | {seconds:.0f} | {seconds / wall:.0%} |" for name, seconds in result["stage_seconds"].items()]
    lines += ["", "| claim | value |", "|---|---|"]
    lines += [f"| {label} | {value(result['metrics'], result['seconds']):.3f} |" for label, value, _ in claims([result])]
    return "\n".join(lines)
