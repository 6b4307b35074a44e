"""Command line: `pipeline validate|run|report|make-data`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.recipe import RecipeError, load_recipe


def run_dir_for(recipe, output_dir: str | None) -> Path:
    return Path(output_dir or recipe.output_dir or f"runs/{recipe.name}").resolve()


def cmd_validate(args) -> int:
    from pipeline.preflight import check_data

    recipe = load_recipe(args.recipe, args.set)
    check_data(recipe)
    print(f"{args.recipe}: valid ({len(recipe.stages)} stages: {', '.join(s.name for s in recipe.stages)})")
    return 0


def cmd_run(args) -> int:
    from pipeline.preflight import check_data, check_output_dir
    from pipeline.runner import Runner

    recipe = load_recipe(args.recipe, args.set)
    selected = [s.strip() for s in args.stages.split(",")] if args.stages else None
    names = [s.name for s in recipe.stages]
    unknown = [s for s in selected or [] if s not in names]
    if unknown:
        from pipeline.schema import suggest

        raise RecipeError([f"--stages: unknown stage '{s}'{suggest(s, names)}" for s in unknown])
    run_dir = run_dir_for(recipe, args.output_dir)
    check_output_dir(run_dir)
    check_data(recipe, selected)
    summary = Runner(recipe, run_dir, selected).run()
    statuses = ", ".join(f"{n}: {s['status']}" for n, s in summary["stages"].items())
    print(f"run finished in {run_dir} ({statuses})")
    return 0


def cmd_report(args) -> int:
    from pipeline.report import write_report

    print(write_report(Path(args.run_dir)))
    return 0


def cmd_make_data(args) -> int:
    from pipeline.datagen import generate_quickstart

    counts = generate_quickstart(Path(args.out_dir), seed=args.seed)
    print(", ".join(f"{name}: {n} rows" for name, n in counts.items()))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pipeline", description="Run a staged post-training recipe.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="check a recipe without training")
    p.add_argument("recipe")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("run", help="run a recipe's stages")
    p.add_argument("recipe")
    p.add_argument("--output-dir", help="run directory (default: the recipe's output_dir, or runs/NAME)")
    p.add_argument("--stages", help="comma-separated stage names to run (others are skipped or left pending)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key, e.g. stages.sft.args.max_steps=10 (repeatable)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("report", help="rebuild report.md for a run directory")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("make-data", help="regenerate the quickstart datasets")
    p.add_argument("out_dir", nargs="?", default="data/quickstart")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_make_data)

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except RecipeError as err:
        print("recipe error:\n  " + "\n  ".join(err.problems), file=sys.stderr)
        return 2
    except Exception as err:
        from pipeline.data import DataError
        from pipeline.training import TrainingDiverged

        if isinstance(err, (DataError, TrainingDiverged)):
            print(f"error: {err}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
