"""`pipeline run`: execute a recipe's stages in order, skipping finished ones and resuming killed ones.

Layout of a run directory:
    summary.json  manifest.json  report.md
    <stage>/fingerprint     what the stage's inputs hash to (written when it starts)
    <stage>/checkpoints/    Trainer checkpoints, kept so a killed stage resumes
    <stage>/output/         the stage's model/tokenizer/data; appears (by rename) only on success
    <stage>/result.json     written last: a stage is complete iff this matches its fingerprint
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from accelerate import PartialState
from transformers import set_seed

from pipeline.config.recipe import Recipe
from pipeline.config.specs import TrainStageSpec
from pipeline.data.prompts import recipe_prompt_format
from pipeline.runtime.process import UserError
from pipeline.models.loading import process_defaults, recipe_precision
from pipeline.outputs.health import stage_findings
from pipeline.outputs.hub import push_if_configured
from pipeline.outputs.report import headline, write_report
from pipeline.run.manifest import write_manifest
from pipeline.run.stage_identity import fingerprint, upstream_stages
from pipeline.runtime import progress
from pipeline.runtime.distributed import LaunchChanged, forget_zero3_init, launch_label, launch_record, on_main
from pipeline.runtime.disk import share_identical
from pipeline.runtime.files import read_json, write_json
from pipeline.stages import STAGE_TYPES
from pipeline.stages.context import StageContext
from pipeline.training.health import HealthFailure, describe, enforce_fail_on


class RunError(UserError, RuntimeError):
    """A run that cannot go on as asked (e.g. `--stages` leaves out a stage another one needs); the message says why."""


# What a rerun of a changed stage keeps until its new output is complete: the last good output and the record
# of the inputs it was made from (checkpoints, logs and the rest belong to the old inputs and are cleared).
KEPT_UNTIL_REPLACED = ("output", "result.json")


class Runner:
    """Runs one recipe into one run directory."""

    def __init__(self, recipe: Recipe, run_dir: Path, selected: list[str] | None = None, log=print):
        self.recipe, self.run_dir = recipe, run_dir
        self.selected = selected
        progress.quiet_library_bars()
        # One process, or this rank under `accelerate launch`, set up as the Trainers will see it.
        defaults = process_defaults()
        self.state = PartialState(cpu=defaults["use_cpu"], backend=defaults["ddp_backend"])
        self.log = log if self.state.is_main_process else (lambda *_: None)  # each line once, not once per rank
        if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and defaults["use_cpu"]:
            self.log("warning: accelerate shards with FSDP only on GPUs; these CPU processes run plain DDP")
        self.summary: dict[str, Any] = {"recipe": recipe.name, "recipe_path": str(recipe.path),
                                        "output_dir": str(run_dir), "stages": {}}
        self.timings: dict[str, float] = {}
        self.evaluating: dict[str, float] = {}  # seconds of each stage's own held-out evaluations
        self.fingerprints: dict[str, str] = {}
        self.launch = launch_record(self.state)  # recorded with each stage it runs
        self.started = datetime.now(timezone.utc).isoformat()  # names this launch in the manifest's history

    @property
    def is_main(self) -> bool:
        return self.state.is_main_process

    def stage_record(self, stage, status: str, metrics: dict[str, float] | None = None,
                     launch: dict[str, Any] | None = None, health: list[dict[str, Any]] | None = None) -> None:
        self.summary["stages"][stage.name] = {
            "type": stage.type, "status": status, "output": str(self.run_dir / stage.name / "output"),
            "metrics": metrics or {}, "fingerprint": self.fingerprints.get(stage.name),
            "launch": launch,  # how the stage was trained (for a skipped one, by an earlier launch)
        }
        if health is not None:  # training stages (pipeline.training.health): [] when healthy
            self.summary["stages"][stage.name]["health"] = health
        if self.is_main:
            write_json(self.run_dir / "summary.json", self.summary)

    def run(self) -> dict[str, Any]:
        with recipe_precision(self.recipe.precision):  # every stage, and the hardware choices its fingerprint holds
            return self.run_stages()

    def run_stages(self) -> dict[str, Any]:
        # The main process hashes the inputs once (model folders can be large); every rank uses its fingerprints.
        self.fingerprints = on_main(self.state, self.hash_inputs, "hashing the run's inputs")
        for stage in self.recipe.stages:
            self.stage_record(stage, "pending")
        self.log(f"launch: {launch_label(self.launch)}")
        if self.is_main:
            write_manifest(self.run_dir, self.recipe, self.fingerprints, self.timings, self.started)
        try:
            for index, stage in enumerate(self.recipe.stages, start=1):
                self.run_stage(stage, progress.begin(index, len(self.recipe.stages), stage.name))
                if isinstance(stage, TrainStageSpec) and stage.push_to_hub:  # upload once when finished (pipeline.outputs.hub); failures reach all ranks
                    status = self.summary["stages"][stage.name]["status"]
                    on_main(self.state, lambda: push_if_configured(self.run_dir, stage, status, self.log), "pushing to the Hub")
        except BaseException:
            # The record of a failed run must not lie: the report says what summary.json says. Written by the
            # main process alone, with no exchange: other ranks may be inside a collective this one left.
            if self.is_main:
                try:
                    self.write_run_files()
                except Exception as err:  # e.g. the full disk that failed the stage: its error is the one to show
                    self.log(f"warning: could not write the manifest and report: {type(err).__name__}: {err}")
                self.log(self.console_summary())
            raise
        on_main(self.state, self.write_run_files, "writing the manifest and report")
        self.log(self.console_summary())
        return self.summary

    def console_summary(self) -> str:
        """The end-of-run table: each stage's status, time and key metric before -> after."""

        rows = [(name, record["status"], progress.duration(self.timings[name]) if self.timings.get(name) else "",
                 headline(record["type"], record["metrics"]))
                for name, record in self.summary["stages"].items()]
        widths = [max(len(row[i]) for row in rows + [("stage", "status", "time", "")]) for i in range(3)]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(("stage", "status", "time"), widths)) + "  key metric"]
        lines += ["  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths)) + f"  {row[3]}" for row in rows]
        return "\n".join(lines)

    def hash_inputs(self) -> dict[str, str]:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fingerprints: dict[str, str] = {}
        for stage in self.recipe.stages:
            fingerprints[stage.name] = fingerprint(
                self.recipe, stage, {u: fingerprints[u] for u in upstream_stages(self.recipe, stage)})
        return fingerprints

    def write_run_files(self) -> None:
        write_manifest(self.run_dir, self.recipe, self.fingerprints, self.timings, self.started)
        write_report(self.run_dir)

    def decide(self, stage, stage_dir: Path, expected: str) -> tuple[str, dict[str, Any] | None]:
        """("skip", result.json) if done with the same inputs, ("pending", None) if not selected, else ("run", None).

        A completed stage is skipped whatever this launch is: its output is valid, and its record keeps
        the launch that trained it.
        """
        previous = read_json(stage_dir / "result.json")
        if previous and previous.get("fingerprint") == expected and (stage_dir / "output").is_dir():
            return "skip", previous
        if self.selected is not None and stage.name not in self.selected:
            return "pending", None  # a selected stage that needs it fails its upstream check below
        missing = [u for u in upstream_stages(self.recipe, stage)
                   if self.summary["stages"][u]["status"] not in ("completed", "skipped")]
        if missing:
            raise RunError(f"stage '{stage.name}' needs {missing}, which have not completed; "
                           f"run them too (--stages {','.join(missing + [stage.name])})")
        self.require_same_launch(stage, stage_dir, expected)
        self.prepare_stage_dir(stage_dir, expected)
        write_json(stage_dir / "launch.json", self.launch)
        return "run", None

    def require_same_launch(self, stage, stage_dir: Path, expected: str) -> None:
        """Refuse to resume checkpoints made under another launch.

        A different process count changes the global batch (per-device batch x processes) and which rows
        each step sees, so the resumed run would silently differ from an unbroken one; DeepSpeed's
        checkpoints are partitioned by rank and stage and do not load into another layout at all.
        """
        checkpoints = stage_dir / "checkpoints"
        resuming = ((stage_dir / "fingerprint").is_file() and (stage_dir / "fingerprint").read_text().strip() == expected
                    and checkpoints.is_dir() and any(checkpoints.iterdir()))
        before = read_json(stage_dir / "launch.json")
        if resuming and before is not None and before != self.launch:
            raise LaunchChanged(
                f"stage '{stage.name}': its checkpoints in {checkpoints} were made by a launch of "
                f"{launch_label(before)}, and this launch is {launch_label(self.launch)}; resuming would change the "
                f"global batch (or cannot load the sharded state). Relaunch as before, or delete {checkpoints} "
                "to train the stage again from its start")

    def run_stage(self, stage, label: str) -> None:
        """Run one stage (`label`: its `[k/N] name`), or skip it if done, or leave it pending if not selected."""
        stage_dir = self.run_dir / stage.name
        expected = self.fingerprints[stage.name]
        # The main process reads the run directory and decides; every rank follows the same decision.
        decision, previous = on_main(self.state, lambda: self.decide(stage, stage_dir, expected),
                                     f"stage '{stage.name}': deciding whether to run")
        if decision == "skip":
            self.log(f"{label}: skipped, already completed with the same inputs")
            record = {"type": stage.type, "metrics": previous.get("metrics") or {}}
            settings = self.recipe.stage_health(stage)  # judged again from its logs: not part of the fingerprint
            health = on_main(self.state, lambda: stage_findings(self.run_dir, stage.name, record, settings),
                             f"stage '{stage.name}': reading its health")
            try:  # a `fail_on` added since the stage trained fails it now, as it would have then
                enforce_fail_on(stage.name, health or [], settings)
            except HealthFailure:
                for found in health:
                    self.log(describe(stage.name, found))
                self.stage_record(stage, "failed", previous.get("metrics"), previous.get("launch"), health)
                raise
            self.stage_record(stage, "skipped", previous.get("metrics"), previous.get("launch"), health)
            return
        if decision == "pending":
            self.log(f"{label}: not selected (--stages), left pending")
            return
        self.log(f"{label}: running ({stage.type})")
        started = time.time()
        ctx = StageContext(self.recipe, stage, self.run_dir, is_main_process=self.is_main)

        metrics: dict[str, float] | None = None
        set_seed(self.recipe.seed)  # before the stage builds its model: fresh weights and LoRA init are seeded too
        forget_zero3_init()  # models load whole, not as ZeRO-3 shards left over from an earlier stage's Trainer
        try:
            with progress.Heartbeat() if self.is_main else contextlib.nullcontext(), \
                    recipe_prompt_format(self.recipe.prompt_format):
                metrics = STAGE_TYPES[stage.type].run(stage, ctx)
            # the whole run checked again from its logs (a `fail_on` finding fails the stage on every rank)
            health = on_main(self.state, lambda: self.final_health(stage, ctx, metrics),
                             f"stage '{stage.name}': checking its health")
        except BaseException as err:
            # Raised at once, not exchanged: other ranks may be inside a collective this one never joins
            # (pipeline.runtime.distributed); the launcher stops them when this process exits.
            self.timings[stage.name] = round(time.time() - started, 2)
            trained = metrics if isinstance(err, HealthFailure) else None  # a judged stage's numbers stand
            self.stage_record(stage, "failed", trained, launch=self.launch, health=getattr(err, "findings", None))
            if self.is_main:
                note = ("" if self.state.num_processes == 1 else "On the main process. A communication error here "
                        "usually means another rank failed first: the launcher's output names it.\n")
                (stage_dir / "error.txt").write_text(note + traceback.format_exc())
            err.pipeline_stage = (stage.name, str(stage_dir / "error.txt"))  # for the one-line message (pipeline.cli)
            self.log(f"{label}: failed after {progress.duration(self.timings[stage.name])}")
            raise
        self.timings[stage.name] = round(time.time() - started, 2)
        self.evaluating[stage.name] = round(progress.evaluation_seconds(), 2)
        on_main(self.state, lambda: self.finish_stage(stage_dir, expected, metrics),
                f"stage '{stage.name}': publishing its output")

        shown = headline(stage.type, metrics)
        evaluating = (f" ({progress.duration(self.evaluating[stage.name])} of it held-out evaluation)"
                      if self.evaluating[stage.name] >= 1 else "")
        self.log(f"{label}: completed in {progress.duration(self.timings[stage.name])}{evaluating}"
                 + (f": {shown}" if shown else ""))
        self.stage_record(stage, "completed", metrics, self.launch, health)

    def final_health(self, stage, ctx: StageContext, metrics: dict[str, float]) -> list[dict[str, Any]] | None:
        """A training stage's findings over its whole log (printing those not printed while it trained)."""
        if not stage.health_checks:
            return None
        history = read_json(ctx.stage_dir / "log_history.json")
        return ctx.health.observe(history if isinstance(history, list) else [], metrics, final=True)

    @staticmethod
    def prepare_stage_dir(stage_dir: Path, expected: str) -> None:
        """Keep checkpoints only if they were made from the same inputs; clear half-written output.

        The last good output and its result.json stay until a new output replaces them (`finish_stage`):
        a changed stage that fails leaves the previous result usable, and still marked with the inputs
        it was made from (so it is never taken for the new one).
        """
        marker = stage_dir / "fingerprint"
        if stage_dir.exists() and (not marker.is_file() or marker.read_text().strip() != expected):
            for item in stage_dir.iterdir():
                if item.name not in KEPT_UNTIL_REPLACED:
                    shutil.rmtree(item) if item.is_dir() else item.unlink()
        stage_dir.mkdir(parents=True, exist_ok=True)
        for leftover in ("output.partial", "adapter.partial", "output.old"):
            shutil.rmtree(stage_dir / leftover, ignore_errors=True)
        marker.write_text(expected)

    def finish_stage(self, stage_dir: Path, expected: str, metrics: dict[str, float]) -> None:
        """Publish the output by rename, then write result.json: the stage is complete only after both."""
        final, old = stage_dir / "output", stage_dir / "output.old"
        (stage_dir / "output.partial").mkdir(exist_ok=True)  # stages that only measure still publish a folder
        if final.exists():
            os.replace(final, old)  # the old output is deleted only once the new one is in place
        (stage_dir / "result.json").unlink(missing_ok=True)  # the old record must never vouch for the new output
        os.replace(stage_dir / "output.partial", final)
        share_identical(self.run_dir, stage_dir)  # one copy of a base several stages merged or copied
        write_json(stage_dir / "result.json", {"fingerprint": expected, "metrics": metrics,
                                               "seconds": self.timings[stage_dir.name],
                                               "eval_seconds": self.evaluating[stage_dir.name], "launch": self.launch})
        shutil.rmtree(old, ignore_errors=True)
