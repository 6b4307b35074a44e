"""Faults, for real: a run killed at a random moment, a diverging loss, an output directory that cannot be written."""

from __future__ import annotations

import json
import random
import re
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.cli import main
from tests.conftest import DATA, REPO, summary, tiny_stages, write_recipe


def kill_stages() -> list[dict]:
    """tokenizer -> pretrain -> sft, each training stage checkpointing every 4 of its 12 steps."""
    stages = tiny_stages(pretrain_steps=12, sft_steps=12)
    for stage in stages[1:]:
        stage["args"].update(save_steps=4, save_total_limit=None)
    return stages


def start_run(recipe: Path) -> subprocess.Popen:
    """`pipeline run RECIPE` in a new process, returned once it has begun (imports done, summary.json written)."""
    process = subprocess.Popen([sys.executable, "-m", "pipeline", "run", str(recipe)], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (recipe.parent / "run" / "summary.json").exists() and process.poll() is None:
        assert time.time() < deadline, "run did not start"
        time.sleep(0.05)
    return process


def test_killed_at_any_moment_the_rerun_gives_the_uninterrupted_metrics(tmp_path, capsys):
    """SIGKILL at a random moment of a real run (its seed is in the failure message), then run again."""
    reference = tmp_path / "reference"
    reference.mkdir()
    process = start_run(write_recipe(reference, kill_stages()))
    started = time.time()
    assert process.wait(timeout=600) == 0
    duration = time.time() - started

    seed = secrets.randbelow(2**32)
    delay = random.Random(seed).uniform(0, duration)
    where = f"killed {delay:.1f}s into a {duration:.1f}s run (seed {seed})"
    killed = tmp_path / "killed"
    killed.mkdir()
    recipe = write_recipe(killed, kill_stages())
    process = start_run(recipe)
    time.sleep(delay)
    finished = process.poll() is not None
    process.kill()  # SIGKILL: nothing gets to clean up
    process.wait()
    statuses = {name: stage["status"] for name, stage in summary(killed / "run")["stages"].items()}
    where += " (it had finished)" if finished else f" (statuses then: {statuses})"

    capsys.readouterr()
    assert main(["run", str(recipe)]) == 0, where
    resumed = re.findall(r"resuming from \S+/(\w+)/checkpoints/checkpoint-(\d+)", capsys.readouterr().out)
    where += f"; resumed {resumed or 'nothing'}"
    print(where)
    expected, got = summary(reference / "run")["stages"], summary(killed / "run")["stages"]
    assert {name: s["status"] in ("completed", "skipped") for name, s in got.items()} == dict.fromkeys(expected, True)
    for name in expected:  # every metric, the resumed stage's train_loss included, bit for bit
        assert got[name]["metrics"] == expected[name]["metrics"], f"stage {name}: {where}"

    # A moment a random kill rarely hits: training done, the output being published (result.json not yet
    # written). The rerun resumes from the checkpoint before the last and again ends with the same metrics.
    stage_dir = reference / "run" / "sft"

    def log_rows() -> list[dict]:  # what plots and run health read, timings aside
        from pipeline.training.trainers import UNREPRODUCIBLE_KEYS
        rows = json.loads((stage_dir / "log_history.json").read_text())
        return [{k: v for k, v in row.items() if not any(t in k for t in UNREPRODUCIBLE_KEYS)} for row in rows]

    whole_log = log_rows()
    (stage_dir / "result.json").unlink()
    (stage_dir / "output").rename(stage_dir / "output.partial")  # as a kill during the save leaves it
    assert main(["run", str(reference / "recipe.yaml")]) == 0
    assert "sft/checkpoints/checkpoint-8" in capsys.readouterr().out
    assert summary(reference / "run")["stages"]["sft"]["metrics"] == expected["sft"]["metrics"]
    # the resumed log: no second step-0 evaluation, the closing train_loss over the whole run
    assert log_rows() == whole_log


def test_resume_passes_over_cut_short_and_final_checkpoints(tmp_path):
    """A kill while the Trainer writes a checkpoint leaves it without (a whole) trainer_state.json, written last;
    from the one at max_steps transformers would train a step too many."""
    from pipeline.training.trainers import last_checkpoint

    states = [(6, json.dumps({"global_step": 6, "max_steps": 24})), (12, '{"global_st'), (18, None),
              (24, json.dumps({"global_step": 24, "max_steps": 24}))]
    for step, state in states:
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"")
        if state is not None:
            (folder / "trainer_state.json").write_text(state)
    assert last_checkpoint(tmp_path) == str(tmp_path / "checkpoint-6")
    assert last_checkpoint(tmp_path / "none-yet") is None


def test_diverging_loss_stops_with_the_stage_and_step(tmp_path, capsys):
    stages = tiny_stages(pretrain_steps=30)[:2]
    # No gradient clipping and plain SGD at an absurd rate: the weights overflow within a few steps.
    stages[1]["args"].update(learning_rate=1e6, optim="sgd", max_grad_norm=0.0)
    code = main(["run", str(write_recipe(tmp_path, stages))])
    err = capsys.readouterr().err
    assert code == 1
    found = re.search(r"error: stage 'base': loss became (nan|inf) at step (\d+); lower the learning rate", err)
    assert found, err
    assert int(found[2]) < 30  # stopped there, not after training on
    assert summary(tmp_path / "run")["stages"]["base"]["status"] == "failed"
    assert not (tmp_path / "run" / "base" / "output").exists()


@pytest.mark.parametrize("where", ["under a file", "a directory even root cannot write to"])
def test_unwritable_output_dir_is_reported_before_training(tmp_path, capsys, where):
    # Tests run as root, so permissions block nothing: a path under a regular file, and sysfs, are real.
    if where == "under a file":
        (tmp_path / "a-file").write_text("")
        out, reason = tmp_path / "a-file" / "run", "Not a directory"
    else:
        out, reason = Path("/sys"), ("Permission denied", "Read-only file system")  # sysfs: no new files
    code = main(["run", str(write_recipe(tmp_path, tiny_stages())), "--output-dir", str(out)])
    err = capsys.readouterr().err
    assert code == 1
    assert f"error: output directory {out} is not writable: " in err and err.strip().endswith(reason), err
    assert not (tmp_path / "run").exists()


def test_nearly_full_disk_is_reported_before_training(tmp_path, capsys, monkeypatch):
    import shutil

    from pipeline.validation import preflight

    # The free-space figure is faked (filling a real disk is not an option here); the check is real.
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda _: usage._replace(free=100 * 2**20))
    code = main(["run", str(write_recipe(tmp_path, tiny_stages()))])
    assert code == 1
    assert "only 100 MiB free on its disk; at least 1024 MiB is needed" in capsys.readouterr().err
    assert not (tmp_path / "run" / "summary.json").exists()


def test_grpo_resumes_only_where_its_generation_cycle_ends(tmp_path, capsys):
    """TRL's GRPO trains `steps_per_generation` steps on one generation's rollouts and saves neither them nor its
    place among them; resumed from a checkpoint inside that cycle it would train on other samples (other weights,
    silently). A rerun after a kill at step 3 of cycles of 2 passes over checkpoint-3 and resumes from
    checkpoint-2: the same metrics and weights as the uninterrupted run."""
    import hashlib
    import shutil

    grpo = {"name": "grpo", "type": "grpo", "model": "sft", "rewards": [{"function": "format"}],
            "dataset": {"path": str(DATA / "prompts.jsonl"), "max_samples": 64, "test_size": 8},
            "args": {"max_steps": 4, "learning_rate": 3e-3, "num_generations": 4, "per_device_train_batch_size": 8,
                     "steps_per_generation": 2, "max_completion_length": 6, "logging_steps": 1, "save_steps": 1,
                     "save_total_limit": None}}
    recipe = write_recipe(tmp_path, tiny_stages(pretrain_steps=10, sft_steps=10) + [grpo])
    assert main(["run", str(recipe)]) == 0
    stage = tmp_path / "run" / "grpo"

    def weights() -> str:
        return hashlib.sha256(b"".join(p.read_bytes() for p in sorted((stage / "output").glob("*.safetensors")))).hexdigest()

    whole, whole_metrics = weights(), json.loads((stage / "result.json").read_text())["metrics"]
    # what a SIGKILL just after checkpoint-3 leaves
    for gone in ("output", "result.json", "log_history.json", "checkpoints/checkpoint-4"):
        shutil.rmtree(stage / gone) if (stage / gone).is_dir() else (stage / gone).unlink(missing_ok=True)
    capsys.readouterr()
    assert main(["run", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert "resuming from" in out and out.split("resuming from", 1)[1].split()[0].endswith("checkpoint-2")
    assert "passing over" in out and "checkpoint-3" in out
    assert weights() == whole and json.loads((stage / "result.json").read_text())["metrics"] == whole_metrics
