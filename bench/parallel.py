"""`python -m bench --parallel-eval N`: the `eval` stage on one process and on N (`accelerate launch
--multi_gpu`, each process answering its share of the prompts), same model and prompts: stage seconds,
prompts per second, the speed-up, and whether the greedy metrics agree."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import yaml

from bench.workloads import DATA, SEED, build_model


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def eval_once(work: Path, model: Path, processes: int, rows: int) -> dict[str, Any]:
    """One `pipeline run` of a recipe holding one eval stage, on `processes` processes; its result.json."""
    run_dir = work / f"run-{processes}"
    recipe = work / f"eval-{processes}.yaml"
    recipe.write_text(yaml.safe_dump({"name": "bench-eval", "seed": SEED, "output_dir": str(run_dir), "stages": [
        {"name": "eval", "type": "eval", "models": [str(model)], "max_new_tokens": 16,
         "dataset": {"path": str(DATA / "eval.jsonl"), "max_samples": rows}}]}))
    launcher = ([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
                 "--main_process_port", str(free_port())] if processes > 1 else [sys.executable])
    done = subprocess.run([*launcher, "-m", "pipeline", "run", str(recipe)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"eval on {processes} process(es) failed:\n{done.stderr[-3000:]}")
    return json.loads((run_dir / "eval" / "result.json").read_text())


def run_parallel_eval(size: str, processes: int, rows: int, log: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    """{processes: {"seconds", "prompts_per_s", "speedup", "same_metrics"}} for 1 and `processes` processes."""
    with tempfile.TemporaryDirectory(prefix="pipeline-bench-") as tmp:
        work = Path(tmp)
        model = build_model(work / "model", size)
        results: dict[str, dict[str, Any]] = {}
        for n in dict.fromkeys((1, processes)):
            result = eval_once(work, model, n, rows)
            results[str(n)] = {"seconds": result["seconds"], "prompts_per_s": rows / result["seconds"],
                               "metrics": result["metrics"]}
            log(f"eval on {n} process(es): {result['seconds']:.1f} s")
    reference, seconds = results["1"]["metrics"], results["1"]["seconds"]
    for entry in results.values():
        entry["speedup"] = seconds / entry["seconds"]
        entry["same_metrics"] = entry.pop("metrics") == reference
    return results


def parallel_table(results: dict[str, dict[str, Any]], size: str, rows: int) -> str:
    lines = [f"eval stage, model {size}, {rows} prompts, greedy, 16 new tokens; stage time (loading included)",
             "| processes | seconds | prompts/s | speed-up | same metrics as 1 process |", "|---|---|---|---|---|"]
    lines += [f"| {n} | {r['seconds']:.1f} | {r['prompts_per_s']:.1f} | {r['speedup']:.2f} | {r['same_metrics']} |"
              for n, r in results.items()]
    return "\n".join(lines)
