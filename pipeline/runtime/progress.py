"""Where a run is: `[3/8] sft: step 120/400, loss 0.812, 1m12s elapsed, about 2m left`.

The runner names the stage (`begin`); Trainer stages report their steps through `StageProgress`,
which replaces transformers' progress bars (a bar redrawn at every step fills a log file with
thousands of updates) with a line at most every `PIPELINE_PROGRESS_SECONDS` (default 15); other
stages get a `Heartbeat` line with the time elapsed.
"""

from __future__ import annotations

import os
import threading
import time

from huggingface_hub.utils import are_progress_bars_disabled, enable_progress_bars
from transformers import TrainerCallback
from transformers.utils import logging

_stage = {"label": "", "started": 0.0, "said": 0.0}  # the running stage; when a progress line was last printed


def quiet_library_bars() -> None:
    """Turn off transformers' own bars (loading weights, writing shards: several per stage, each redrawn in a
    log file) but keep huggingface_hub's download bars, the only progress a long first download shows."""

    hub_bars = not are_progress_bars_disabled()
    logging.disable_progress_bar()  # also turns off the Hub's
    if hub_bars:
        enable_progress_bars()


def begin(index: int, total: int, name: str) -> str:
    """Mark stage `index` (1-based) of `total` as the one running; returns its `[k/N] name` label."""
    _stage.update(label=f"[{index}/{total}] {name}", started=time.time(), said=time.time())
    return _stage["label"]


def interval_seconds() -> float:
    return float(os.environ.get("PIPELINE_PROGRESS_SECONDS", 15))


def say(line: str) -> None:
    """Print a progress line (and note when, so the heartbeat keeps quiet while a stage reports itself)."""
    print(line, flush=True)
    _stage["said"] = time.time()


class Heartbeat:
    """`[8/8] eval: running, 2m30s elapsed` whenever a stage has said nothing for 4 progress intervals: for the
    stages without Trainer steps (tokenizer, eval, generate; PPO draws its own bar), from a background thread."""

    def __init__(self, interval: float | None = None):
        self.interval = 4 * interval_seconds() if interval is None else interval
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.beat, daemon=True, name="pipeline-heartbeat")

    def tick(self) -> None:
        """Print the line if it is due."""
        if time.time() - _stage["said"] >= self.interval:
            say(f"{_stage['label']}: running, {duration(stage_elapsed())} elapsed")

    def beat(self) -> None:
        while not self.stop.wait(min(self.interval, 5.0)):
            self.tick()

    def __enter__(self) -> "Heartbeat":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


def stage_label() -> str:
    return _stage["label"]


def stage_elapsed() -> float:
    return time.time() - _stage["started"]


def duration(seconds: float) -> str:
    """`42s`, `1m12s`, `2h05m`."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def progress_line(label: str, step: int, max_steps: int, loss: float | None, elapsed: float,
                  left: float | None) -> str:
    parts = [f"step {step}/{max_steps}"] + ([f"loss {loss:.4g}"] if loss is not None else [])
    parts.append(f"{duration(elapsed)} elapsed")
    if left is not None:
        parts.append(f"about {duration(left)} left")
    return f"{label}: " + ", ".join(parts)


class StageProgress(TrainerCallback):
    """A progress line per interval from the Trainer's steps, with an estimate from the steps so far."""

    def __init__(self, interval: float | None = None):
        self.interval = interval_seconds() if interval is None else interval
        self.first_step: int | None = None  # the step this process started from (a resumed run starts later)
        self.began = self.last = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self.first_step, self.began = state.global_step, time.time()
        self.last = self.began

    def on_step_end(self, args, state, control, **kwargs):
        now = time.time()
        if now - self.last < self.interval or not state.is_world_process_zero:
            return
        self.last = now
        done = state.global_step - (self.first_step or 0)
        left = (now - self.began) / done * (state.max_steps - state.global_step) if done > 0 else None
        losses = [row["loss"] for row in state.log_history if "loss" in row]
        elapsed = stage_elapsed() if stage_label() else now - self.began  # outside a run: since training began
        say(progress_line(stage_label() or "training", state.global_step, state.max_steps,
                          losses[-1] if losses else None, elapsed, left))
