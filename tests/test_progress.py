"""The run's progress lines: stage k of N, steps, elapsed time and an estimate of what is left."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from types import SimpleNamespace

import pytest

from pipeline.runtime import progress
from tests.conftest import REPO


def test_durations_read_as_a_person_writes_them():
    assert [progress.duration(s) for s in (0.4, 42, 72, 3599, 7500)] == ["0s", "42s", "1m12s", "59m59s", "2h05m"]


def test_a_line_per_interval_with_an_estimate_from_the_steps_so_far(capsys, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(progress.time, "time", lambda: clock[0])
    label = progress.begin(3, 8, "sft")
    assert label == "[3/8] sft"
    callback = progress.StageProgress(interval=30)
    state = SimpleNamespace(global_step=100, max_steps=400, is_world_process_zero=True, log_history=[])
    clock[0] += 12  # loading took 12 s; training resumes at step 100 (from a checkpoint)
    callback.on_train_begin(None, state, None)
    for step in range(101, 130):  # 2 s a step
        clock[0] += 2
        state.global_step = step
        if step == 120:
            state.log_history.append({"loss": 0.8123, "step": 120})
        callback.on_step_end(None, state, None)
    lines = capsys.readouterr().out.splitlines()
    # 30 s after training began, at step 115: 15 steps in 30 s, 285 to go
    assert lines == ["[3/8] sft: step 115/400, 42s elapsed, about 9m30s left"]
    clock[0] += 30  # a slow step: the estimate follows the mean so far (30 steps in 88 s, 270 to go)
    state.global_step = 130
    callback.on_step_end(None, state, None)
    assert capsys.readouterr().out == "[3/8] sft: step 130/400, loss 0.8123, 1m40s elapsed, about 13m12s left\n"


def test_heartbeat_speaks_only_when_the_stage_has_been_quiet(capsys, monkeypatch):
    clock = [500.0]
    monkeypatch.setattr(progress.time, "time", lambda: clock[0])
    progress.begin(8, 8, "eval")
    heartbeat = progress.Heartbeat(interval=60)
    clock[0] += 59
    heartbeat.tick()
    assert capsys.readouterr().out == ""
    clock[0] += 91
    heartbeat.tick()
    assert capsys.readouterr().out == "[8/8] eval: running, 2m30s elapsed\n"
    clock[0] += 30
    progress.say("[8/8] eval: something else said where it is")
    clock[0] += 59
    heartbeat.tick()  # 59 s since the last line: quiet
    assert capsys.readouterr().out == "[8/8] eval: something else said where it is\n"


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
def test_deepspeed_cpu_notice_is_filtered_at_its_source():
    code = ("from pipeline.runtime.process import prepare_process; prepare_process(); "
            "import deepspeed; from deepspeed.accelerator import get_accelerator; get_accelerator()")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Setting accelerator to CPU" not in result.stdout + result.stderr
