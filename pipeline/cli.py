"""Command line: `pipeline validate|run|report|health|push|explain`."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from pipeline.config.recipe import PRECISIONS
from pipeline.config.schema import RecipeError, suggest
from pipeline.config.specs import PushSpec
from pipeline.runtime.process import UserError, prepare_process, rank_label

# Each command imports the libraries it needs when it runs (marked `lazy`), after `prepare_process`: `--help`
# needs none of them, and some warn on import.


def run_dir_for(recipe, output_dir: str | None) -> Path:
    return Path(output_dir or recipe.output_dir or f"runs/{recipe.name}").resolve()


def print_warnings(warnings: list[str]) -> None:
    for warning in warnings:
        print(f"{rank_label()}warning: {warning}", file=sys.stderr)


def cmd_validate(args) -> int:
    from pipeline.config.paths import output_dir_problem  # lazy: see above
    from pipeline.config.recipe import read_recipe  # lazy: see above
    from pipeline.validation.verdicts import remember, remembered, verdict_key  # lazy: see above

    path = Path(args.recipe)
    # --explain and --check-remote report more than a verdict (configs, servers' state): always checked in full
    key = None if args.no_cache or args.explain or args.check_remote else verdict_key(path, read_recipe(path, args.set), {})
    verdict = remembered(key) if key else None
    if verdict is None:
        verdict = full_validation(args)
        if key:
            remember(key, verdict)
    else:
        print(f"validate: nothing the checks read has changed since they passed at {verdict['checked']} "
              "(--no-cache checks again)", file=sys.stderr)
    problem = output_dir_problem(Path(verdict["output_dir"]))  # the folder's state is not in the key: always read
    if problem:
        raise RecipeError([f"{args.recipe}: output_dir: {problem}"])
    print_warnings(verdict["warnings"])
    print(verdict["output"], end="")
    return 0


def full_validation(args) -> dict:
    """Every check of `pipeline validate`; raises on a problem, else {output, warnings, output_dir, checked}."""
    from datetime import datetime, timezone  # lazy: see above

    from pipeline.validation.explain import explain_recipe  # lazy: see above
    from pipeline.validation.preflight import (check_data, check_launch, remote_problems,  # lazy: see above
                                               setting_warnings)
    from pipeline.validation.prompt_checks import prompt_renderings  # lazy: see above
    from pipeline.validation.recipe_checks import load_recipe  # lazy: see above

    recipe = load_recipe(args.recipe, args.set)
    check_launch(recipe)
    unreachable = remote_problems(recipe) if args.check_remote else []
    if unreachable:
        raise RecipeError(unreachable)
    renderings, warnings = prompt_renderings(recipe)
    output = renderings + ([explain_recipe(recipe) + "\n"] if args.explain else [])
    output.append(f"{args.recipe}: valid ({len(recipe.stages)} stages: {', '.join(s.name for s in recipe.stages)})")
    return {"output": "\n".join(output) + "\n", "warnings": setting_warnings(recipe) + check_data(recipe) + warnings,
            "output_dir": str(run_dir_for(recipe, None)), "checked": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def cmd_explain(args) -> int:
    from pipeline.validation.explain import explain_stage_type  # lazy: see above

    try:
        print(explain_stage_type(args.stage_type))
    except KeyError as err:
        raise RecipeError([err.args[0]]) from None
    return 0


def cmd_run(args) -> int:
    from pipeline.run.runner import Runner  # lazy: see above
    from pipeline.validation.preflight import (check_data, check_launch, check_output_dir,  # lazy: see above
                                               setting_warnings)
    from pipeline.validation.recipe_checks import load_recipe  # lazy: see above

    recipe = load_recipe(args.recipe, args.set)
    selected = [s.strip() for s in args.stages.split(",")] if args.stages else None
    names = [s.name for s in recipe.stages]
    unknown = [s for s in selected or [] if s not in names]
    if unknown:
        raise RecipeError([f"--stages: unknown stage '{s}'{suggest(s, names)}" for s in unknown])
    check_launch(recipe, selected)
    run_dir = run_dir_for(recipe, args.output_dir)
    check_output_dir(run_dir)
    warnings = setting_warnings(recipe) + check_data(recipe, selected, hub=True)
    runner = Runner(recipe, run_dir, selected)
    if runner.is_main:
        print_warnings(warnings)
    runner.run()
    runner.log(f"run finished in {run_dir}")
    if runner.state.num_processes > 1:
        exit_finished_rank(runner.state)
    return 0


def exit_finished_rank(state) -> None:
    """End a rank of a finished multi-process run without interpreter finalization.

    Finalizing can abort a finished run: gloo work objects still referenced (a DDP reducer's, say) are destroyed
    while the interpreter tears down and SIGABRT the rank ("terminate called without an active exception";
    pytorch/pytorch#190489, #179291), which `accelerate launch` reports as a failed run. Destroying the process
    group first narrowed that but CI still saw it, so every rank meets the others, destroys the group, flushes
    what it wrote, and leaves with `os._exit`. Only on success: a failed rank may leave others inside a
    collective that destroying would hang.
    """
    state.wait_for_everyone()
    state.destroy_process_group()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def cmd_report(args) -> int:
    from pipeline.outputs.report import write_report  # lazy: see above

    print(write_report(Path(args.run_dir)))
    return 0


def cmd_health(args) -> int:
    """Each training stage's findings, from the logs on disk (also of a run from before run health existed)."""
    from pipeline.outputs.health import health_lines, run_health  # lazy: see above

    try:
        found = run_health(Path(args.run_dir))
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print("\n".join(health_lines(found)) or "no training stage has completed")
    return 0


def cmd_push(args) -> int:
    from pipeline.outputs.hub import push_stage  # lazy: see above

    push = PushSpec(repo_id=args.repo_id, private=args.private, revision=args.revision, merge_adapter=args.merge_adapter)
    try:
        push_stage(Path(args.run_dir), args.stage, push)
    except (ValueError, OSError) as err:  # bad stage or repo id, missing run; HfHubHTTPError is an OSError
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


def cmd_serve(args) -> int:
    from pipeline.models.loading import recipe_precision  # lazy: see above
    from pipeline.serving.reward_server import serve  # lazy: see above

    with recipe_precision(args.precision):
        serve(args.model, args.host, args.port, args.batch_size, args.run_dir)
    return 0


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
    p.add_argument("--explain", action="store_true",
                   help="also print each training stage's resolved config and where every value came from")
    p.add_argument("--check-remote", action="store_true", help="also check that every served reward answers")
    p.add_argument("--no-cache", action="store_true",
                   help="check in full even if nothing the checks read has changed since this recipe last passed")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("explain", parents=[common], help="every key of a stage type: its type, default and help")
    p.add_argument("stage_type")
    p.set_defaults(func=cmd_explain)

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

    p = sub.add_parser("health", parents=[common], help="each training stage's run-health findings, from its logs")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_health)

    p = sub.add_parser("push", parents=[common], help="upload a finished stage's output and a model card to the Hugging Face Hub")
    p.add_argument("run_dir")
    p.add_argument("stage")
    p.add_argument("--repo-id", required=True, help="owner/name; the token comes from HF_TOKEN or `hf auth login`")
    p.add_argument("--private", action="store_true", help="create the repo as private")
    p.add_argument("--revision", help="branch to commit to (created if missing; default: main)")
    p.add_argument("--merge-adapter", action="store_true", help="upload a LoRA adapter merged into its base")
    p.set_defaults(func=cmd_push)



    p = sub.add_parser("serve", parents=[common],
                       help="serve a reward model (POST /score) or a causal LM (OpenAI chat completions) over HTTP")
    p.add_argument("model", help="a reward stage (its folder runs/NAME/STAGE, or its name), a model folder or a Hub id")
    p.add_argument("--run-dir", help="with a stage name: the run it is in (default: the one under runs/ that has it)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--batch-size", type=int, default=32, help="pairs per forward pass")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="as a recipe's `precision`: auto (bf16 on GPUs that support it, fp32 on CPUs), fp32 or bf16")
    p.set_defaults(func=cmd_serve)

    args = parser.parse_args(argv)
    prepare_process()
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
    return isinstance(err, UserError)


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
