"""Run the measurements (fresh processes, pipeline and direct interleaved) and reduce them per stage type."""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

from pipeline.bench.workloads import WORKLOADS, build_model, split_data

def measure(job: dict[str, Any]) -> dict[str, Any]:
    """Run one child process and return its RESULT line."""
    env = {**os.environ, "TQDM_DISABLE": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
    done = subprocess.run([sys.executable, "-m", "pipeline.bench.child", json.dumps(job)],
                          capture_output=True, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"bench {job['stage']} ({job['path']}) failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def throughput(runs: list[dict[str, Any]], steps: int, samples_per_step: int, flops: float) -> dict[str, float]:
    """Median throughput of one path's runs; MFU = 6 N tokens/s over the measured peak FLOP/s."""
    loop = statistics.median(r["loop_s"] for r in runs)
    tokens = statistics.median(r["train_tokens"] for r in runs)
    params = runs[0]["num_parameters"]
    out = {"tokens_per_s": tokens / loop, "samples_per_s": steps * samples_per_step / loop,
           "mfu": 6 * params * tokens / loop / flops, "peak_mem_mb": max(r["peak_mem_mb"] for r in runs),
           "loop_s": loop, "stage_s": statistics.median(r["stage_s"] for r in runs), "num_parameters": params}
    generated = [r for r in runs if r["generation_s"] > 0]
    if generated:
        out["generation_tokens_per_s"] = statistics.median(r["generated_tokens"] / r["generation_s"] for r in generated)
    return out


def bench_stage(stage: str, work: Path, model: Path, steps: int, repeats: int, flops: float,
                log: Callable[[str], None]) -> dict[str, Any]:
    workload = WORKLOADS[stage]
    data = split_data(work / "data" / stage, workload.data, max(steps * workload.samples_per_step, 256))
    runs: dict[str, list[dict[str, Any]]] = {"pipeline": [], "direct": []}
    for repeat in range(repeats):
        for path in runs:  # interleaved, so drift in machine load hits both paths alike
            job = {"stage": stage, "path": path, "model": str(model), "train": str(data[0]), "eval": str(data[1]),
                   "args": {**workload.args, "max_steps": steps}, "stage_keys": workload.stage,
                   "out": str(work / f"{stage}-{path}-{repeat}")}
            runs[path].append(measure(job))
            last = runs[path][-1]
            log(f"{stage} {path} #{repeat + 1}: loop {last['loop_s']:.2f}s, stage {last['stage_s']:.2f}s")
    result = throughput(runs["pipeline"], steps, workload.samples_per_step, flops)
    direct = throughput(runs["direct"], steps, workload.samples_per_step, flops)
    pairs = list(zip(runs["pipeline"], runs["direct"]))
    result.update(
        overhead_ratio=statistics.median(p["loop_s"] / d["loop_s"] for p, d in pairs),
        overhead_ratio_cpu=statistics.median(p["loop_cpu_s"] / d["loop_cpu_s"] for p, d in pairs),
        # fastest over fastest: other processes' load only ever adds time, so this ratio is the least disturbed
        overhead_ratio_best=min(r["loop_s"] for r in runs["pipeline"]) / min(r["loop_s"] for r in runs["direct"]),
        stage_time_ratio=statistics.median(p["stage_s"] / d["stage_s"] for p, d in pairs),
        direct_tokens_per_s=direct["tokens_per_s"], direct_loop_s=direct["loop_s"], direct_stage_s=direct["stage_s"],
        direct_peak_mem_mb=direct["peak_mem_mb"],
        attn_implementation=runs["pipeline"][0]["attn_implementation"], peak_flops=flops, steps=steps, repeats=repeats,
        threads=runs["pipeline"][0]["threads"])
    return result


def run_bench(stages: list[str], size: str, steps: int, repeats: int, log: Callable[[str], None]) -> dict[str, Any]:
    from pipeline.bench.probe import peak_flops

    flops = peak_flops()
    log(f"measured peak: {flops / 1e9:.1f} GFLOP/s")
    with tempfile.TemporaryDirectory(prefix="pipeline-bench-") as tmp:
        work = Path(tmp)
        model = build_model(work / f"model-{size}", size)
        return {stage: bench_stage(stage, work, model, steps, repeats, flops, log) for stage in stages}


def check_finite(results: dict[str, Any]) -> None:
    bad = [f"{s}.{k}" for s, r in results.items() for k, v in r.items()
           if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        raise RuntimeError(f"non-finite measurements: {bad}")


COLUMNS = [("tokens_per_s", "tokens/s", ".0f"), ("samples_per_s", "samples/s", ".1f"),
           ("generation_tokens_per_s", "gen tok/s", ".0f"), ("peak_mem_mb", "peak MB", ".0f"),
           ("mfu", "MFU", ".2%"), ("overhead_ratio", "loop ratio", ".3f"), ("stage_time_ratio", "stage ratio", ".2f")]


def table(results: dict[str, Any]) -> str:
    lines = [f"{'stage':9}" + "".join(f"{title:>12}" for _, title, _ in COLUMNS)]
    for stage, r in results.items():
        lines.append(f"{stage:9}" + "".join(f"{format(r[k], fmt) if k in r else '-':>12}" for k, _, fmt in COLUMNS))
    return "\n".join(lines)


def command(args) -> int:
    """`pipeline bench` (argparse namespace from `pipeline.cli`)."""
    import contextlib

    from pipeline.bench.workloads import SIZES

    stages = [s.strip() for s in args.stages.split(",")]
    unknown = [s for s in stages if s not in WORKLOADS]
    if unknown:
        print(f"error: --stages: unknown stage type(s) {unknown}; choose from {', '.join(WORKLOADS)}", file=sys.stderr)
        return 2

    def log(message: str) -> None:  # progress to stderr, so --json leaves stdout one JSON object
        print(message, file=sys.stderr, flush=True)

    if args.threads:  # children inherit it; torch reads it when it starts
        import torch

        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)  # for the peak-FLOP/s measurement in this process
    if args.scaling:
        from pipeline.bench.scaling import run_scaling

        print(run_scaling(args.model_size, args.steps, log))
        return 0
    with contextlib.redirect_stdout(sys.stderr):  # libraries' import-time chatter (DeepSpeed's) must not reach stdout
        results = run_bench(stages, args.model_size, args.steps, args.repeats, log)
    check_finite(results)
    report = (f"model {args.model_size} {SIZES[args.model_size]}, {args.steps} steps, median of {args.repeats}, "
              f"{results[stages[0]]['threads']} threads\n{table(results)}")
    if args.json:
        log(report)  # the table too, on stderr
    print(json.dumps(results) if args.json else report)
    return 0
