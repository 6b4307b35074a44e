"""Where a run is: `[3/8] sft: step 120/400, loss 0.812, 1m12s elapsed, about 2m left`.

The runner names the stage (`begin`); Trainer stages report their steps through `StageProgress`,
which replaces transformers' progress bars (a bar redrawn at every step fills a log file with
thousands of updates) with a line at most every `PIPELINE_PROGRESS_SECONDS` (default 15); other
stages get a `Heartbeat` line with the time elapsed. A stage's own held-out evaluations announce themselves
(`held_out_evaluation`), and their time is kept for the report (`evaluation_seconds`).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from typing import Iterator

from huggingface_hub.utils import are_progress_bars_disabled, enable_progress_bars
from transformers import TrainerCallback
from transformers.utils import logging

# The running stage; when a progress line was last printed; seconds its held-out evaluations took so far.
_stage = {"label": "", "started": 0.0, "said": 0.0, "evaluating": 0.0}


def quiet_library_bars() -> None:
    """Turn off transformers' own bars (loading weights, writing shards: several per stage, each redrawn in a
    log file) but keep huggingface_hub's download bars, the only progress a long first download shows."""

    hub_bars = not are_progress_bars_disabled()
    logging.disable_progress_bar()  # also turns off the Hub's
    if hub_bars:
        enable_progress_bars()


def begin(index: int, total: int, name: str) -> str:
    """Mark stage `index` (1-based) of `total` as the one running; returns its `[k/N] name` label."""
    _stage.update(label=f"[{index}/{total}] {name}", started=time.time(), said=time.time(), evaluating=0.0)
    return _stage["label"]


def interval_seconds() -> float:
    return float(os.environ.get("PIPELINE_PROGRESS_SECONDS", 15))


def say(line: str) -> None:
    """Print a progress line (and note when, so the heartbeat keeps quiet while a stage reports itself)."""
    print(line, flush=True)
    _stage["said"] = time.time()


@contextlib.contextmanager
def held_out_evaluation(what: str, rows: int, main_process: bool = True) -> Iterator[None]:
    """Announce one of the running stage's own held-out evaluations (`what`, on how many rows), and add the time
    it takes to the stage's `evaluation_seconds`: a console silent before step 1 is usually one of these."""
    if main_process:
        say(f"{stage_label() or 'stage'}: {what} on {rows} held-out row{'s' * (rows != 1)}")
    began = time.time()
    try:
        yield
    finally:
        _stage["evaluating"] += time.time() - began


def evaluation_seconds() -> float:
    """Seconds the running stage has spent in its held-out evaluations."""
    return _stage["evaluating"]


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


class StepLines:
    """A progress line at most once per interval for a loop of `total` steps that (re)starts at step `first`,
    with an estimate of the time left from the steps this process has taken; for any step loop (PPO's own)."""

    def __init__(self, total: int, first: int = 0, interval: float | None = None):
        self.total, self.first = total, first
        self.interval = interval_seconds() if interval is None else interval
        self.began = self.last = time.time()

    def due(self) -> bool:
        return time.time() - self.last >= self.interval

    def show(self, step: int, loss: float | None = None) -> None:
        now = time.time()
        self.last = now
        done = step - self.first
        left = (now - self.began) / done * (self.total - step) if done > 0 else None
        elapsed = stage_elapsed() if stage_label() else now - self.began  # outside a run: since the loop began
        say(progress_line(stage_label() or "training", step, self.total, loss, elapsed, left))


class StageProgress(TrainerCallback):
    """A progress line per interval from the Trainer's steps (`StepLines`)."""

    def __init__(self, interval: float | None = None):
        self.interval = interval
        self.lines: StepLines | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.lines = StepLines(state.max_steps, state.global_step, self.interval)  # a resumed run starts later

    def on_step_end(self, args, state, control, **kwargs):
        if self.lines is None or not self.lines.due() or not state.is_world_process_zero:
            return
        losses = [row["loss"] for row in state.log_history if "loss" in row]
        self.lines.show(state.global_step, losses[-1] if losses else None)
