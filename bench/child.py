"""One measurement in a fresh process, so its peak memory is its own:
    python -m bench.child '{"stage": "sft", "path": "pipeline"|"direct", "model": DIR,
                                     "train": FILE, "eval": FILE, "args": {...}, "stage_keys": {...}, "out": DIR,
                                     "sync": {"dir": DIR, "me": NAME, "partner": NAME}}'   (sync: optional)

Prints `RESULT {json}` as its last line: the probe's numbers plus `stage_s`, the whole stage's wall
time (loading, data preparation, training, the pipeline's extra evaluations, saving; not waiting for a
concurrent partner).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from bench.direct import run_script
from bench.probe import Probe, current_memory_mb
from bench.workloads import hardware_args, write_recipe
from pipeline.run.runner import Runner
from pipeline.validation.recipe_checks import load_recipe


def run_pipeline(job: dict[str, Any]) -> float:
    """The stage through the pipeline: a one-stage recipe run by `Runner`; returns the runner's stage time."""

    stage = {"name": "bench", "type": job["stage"], "model": job["model"],
             "dataset": {"path": job["train"], "eval": job["eval"]}, "args": job["args"], **job["stage_keys"]}
    recipe = write_recipe(Path(job["out"]), stage)
    runner = Runner(load_recipe(str(recipe)), Path(job["out"]) / "run", log=lambda *_: None)
    runner.run()
    return runner.timings["bench"]


def run_direct(job: dict[str, Any]) -> float:
    started = time.perf_counter()
    run_script(job["stage"], Path(job["model"]), Path(job["train"]), {**hardware_args(), **job["args"]}, Path(job["out"]))
    return time.perf_counter() - started


def main(job: dict[str, Any]) -> dict[str, Any]:
    probe = Probe(job.get("sync"))
    probe.install()
    baseline = current_memory_mb()  # after the libraries are imported, before any model is loaded
    stage_s = (run_pipeline if job["path"] == "pipeline" else run_direct)(job)
    return {**probe.report(), "baseline_mem_mb": baseline, "stage_s": stage_s - probe.result.partner_wait_s}


if __name__ == "__main__":
    print("RESULT " + json.dumps(main(json.loads(sys.argv[1]))), flush=True)
