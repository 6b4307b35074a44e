"""A `PPOTrainer`'s checkpoints, outside the algorithm: the stage saves through `train`'s `on_step_end` hook and
resumes before training.

A checkpoint is accelerate's state (weights, optimizer, scheduler, RNG) plus PPO's own: the step (which also
says where critic warm-up stands), the KL coefficient, the running reward statistics, the log history and every
rank's prompt sampler (each rank draws its own prompts). A rerun
after a kill resumes from the latest complete one and ends where an uninterrupted run does, step for step.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pipeline.algorithms.ppo_trainer.maths import RunningMoments
from pipeline.algorithms.ppo_trainer.trainer import PPOTrainer
from pipeline.runtime.files import read_json, write_json

STATE_FILE = "ppo_state.json"  # written last, by the main process: its presence marks a checkpoint complete


class Checkpoints:
    """`checkpoint-{step}` folders under `directory`: `resume()` before `train`, `on_step_end` as its hook."""

    def __init__(self, trainer: PPOTrainer, directory: Path):
        self.trainer, self.directory = trainer, directory

    def on_step_end(self, step: int, metrics: dict[str, float]) -> None:
        """Save every `save_steps` steps, except after the last (the stage saves the final policy itself)."""
        if step % self.trainer.config.save_steps == 0 and step < self.trainer.config.max_steps:
            self.save()

    def save(self) -> None:
        trainer, accelerator = self.trainer, self.trainer.accelerator
        target = self.directory / f"checkpoint-{trainer.global_step}"
        accelerator.save_state(str(target))
        rank = accelerator.process_index
        (target / f"sampler_rank{rank}.json").write_text(json.dumps(trainer.generator.get_state().tolist()))
        accelerator.wait_for_everyone()  # every sampler is on disk before the checkpoint is marked complete
        if accelerator.is_main_process:
            state = {"step": trainer.global_step, "kl_coef": trainer.kl_controller.value,
                     "reward_moments": trainer.reward_moments.state_dict(), "log_history": trainer.log_history,
                     "world_size": accelerator.num_processes}
            write_json(target / STATE_FILE, state)  # by rename: a kill mid-write leaves no half a state
        accelerator.wait_for_everyone()

    def resume(self) -> None:
        """Restore the trainer from the latest complete checkpoint, if there is one."""
        trainer, accelerator = self.trainer, self.trainer.accelerator
        states = {p: read_json(p / STATE_FILE) for p in self.directory.glob("checkpoint-*")}
        done = [p for p, state in states.items() if state is not None]  # a checkpoint written by an older version
        if not done:                                                     # may hold a state cut short
            return
        latest = max(done, key=lambda p: int(p.name.rsplit("-", 1)[1]))
        state = states[latest]
        if state.get("world_size", 1) != accelerator.num_processes:
            raise ValueError(f"{latest} was written by {state.get('world_size', 1)} processes; this launch has "
                             f"{accelerator.num_processes}. PPO resumes only with the same number (each "
                             "process's prompt sampler is saved); relaunch with that many, or delete the checkpoints")
        accelerator.load_state(str(latest))
        trainer.global_step, trainer.kl_controller.value = state["step"], state["kl_coef"]
        trainer.reward_moments = RunningMoments(**state["reward_moments"])
        trainer.log_history = state["log_history"]
        sampler = json.loads((latest / f"sampler_rank{accelerator.process_index}.json").read_text())
        trainer.generator.set_state(torch.tensor(sampler, dtype=torch.uint8))
        if accelerator.is_main_process:
            print(f"resuming from {latest}", flush=True)
