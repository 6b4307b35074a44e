"""DAPO's dynamic sampling (Yu et al., 2025) for TRL's `GRPOTrainer` and `RLOOTrainer`, which have none.

A group (the `num_generations` samples of one prompt) whose samples all got the same total reward has zero
advantage under a group baseline, so it carries no policy gradient. `DynamicSampling` sets such groups aside and
draws more prompts until every process's generation batch is full of groups with reward variance, at most
`max_draws` draws a batch; a batch still short then is topped up with set-aside groups, so its size never changes.

Built on two of TRL's extension points, both methods of the trainer: `_generate_and_score_completions` (the whole
rollout of one generation batch: sample, score, advantages, reference log-probabilities), called again for each
draw and the results merged; `_calculate_rewards`, whose rewards (gathered over processes) say which groups are flat.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

# The tensors of TRL's text rollouts that hold one row per sample and one column per token: prompts are
# left-padded, everything on the completion side right-padded (pad columns are masked out by `completion_mask`).
LEFT_PADDED = ("prompt_ids", "prompt_mask")
RIGHT_PADDED = ("completion_ids", "completion_mask", "tool_mask", "old_per_token_logps", "ref_per_token_logps",
                "sampling_per_token_logps", "importance_sampling_ratio")
PER_SAMPLE = ("advantages", "old_logps")  # RLOO's old_logps: a sequence's summed log-probability


def zero_variance_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """A bool per group: its scored samples all got the same reward (NaN, TRL's unscorable sample, is left out)."""
    groups = rewards.view(-1, group_size)
    scored = ~groups.isnan()
    spread = groups.masked_fill(~scored, -math.inf).amax(1) - groups.masked_fill(~scored, math.inf).amin(1)
    return ~(spread > 1e-6)  # fewer than two scored samples: no spread either


def total_rewards(rewards_per_func: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Each sample's weighted reward, as TRL totals it: NaN where every reward function returned None."""
    total = (rewards_per_func * weights.to(rewards_per_func.device)).nansum(1)
    return total.masked_fill(rewards_per_func.isnan().all(1), math.nan)


def select_rows(batch: dict[str, Any], rows: torch.Tensor) -> dict[str, Any]:
    """The samples `rows` (a bool mask) of a scored rollout; `num_items_in_batch` is left for the caller."""
    unknown = set(batch) - set(LEFT_PADDED + RIGHT_PADDED + PER_SAMPLE) - {"num_items_in_batch"}
    if unknown:  # multimodal rollouts: pixel tensors have no row per sample to select
        raise ValueError(f"dynamic sampling handles text rollouts only; cannot merge {sorted(unknown)}")
    return {key: value[rows] for key, value in batch.items() if key != "num_items_in_batch"}


def concatenate(batches: list[dict[str, torch.Tensor]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Rollouts of different widths as one: each token tensor padded to the widest on its own side."""
    merged = {}
    for key in batches[0]:
        parts = [batch[key] for batch in batches]
        if key in LEFT_PADDED + RIGHT_PADDED:
            width = max(part.size(1) for part in parts)
            value = pad_token_id if key.endswith("_ids") else 0
            parts = [F.pad(part, (width - part.size(1), 0) if key in LEFT_PADDED else (0, width - part.size(1)),
                           value=value) for part in parts]
        merged[key] = torch.cat(parts)
    return merged


class DynamicSampling:
    """Put ahead of `GRPOTrainer` or `RLOOTrainer` in a class's bases (see `with_dynamic_sampling`).

    Logged per generation batch, beside TRL's metrics: `zero_variance_fraction` (share of the groups drawn whose
    rewards were all equal), `dynamic_sampling/draws` and `dynamic_sampling/filled_fraction` (share of the trained
    batch made of groups with reward variance). TRL appends its own sampling metrics (`reward`, `reward_std`,
    `frac_reward_zero_std`, `rewards/*`, `completions/*`, RLOO's `kl`) once per call: only the first draw's are
    kept, so they describe the policy's own samples, not the filtered batch it trains on.
    """

    max_draws: int  # generation batches drawn at most per training batch, the first included

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list) -> torch.Tensor:
        # TRL gathers the rewards over processes here: every rank sees every group's, so all decide alike.
        self._gathered_rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        return self._gathered_rewards

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        if not self.model.training:  # evaluation scores what it is given
            return super()._generate_and_score_completions(inputs)
        group, processes = self.num_generations, self.accelerator.num_processes
        groups_needed = len(inputs) // group
        if len(inputs) % group:
            raise ValueError(f"dynamic sampling needs whole groups on each process: per_device_train_batch_size x "
                             f"steps_per_generation ({len(inputs)}) must be a multiple of num_generations ({group})")
        metrics = self._metrics["train"]
        kept, set_aside = [], []
        kept_groups = torch.zeros(processes, dtype=torch.long)  # per process, over the draws so far
        flat_groups = 0
        for draw in range(self.max_draws):
            rows = inputs if draw == 0 else self._drawn_rows(groups_needed, draw)
            batch = super()._generate_and_score_completions(rows)
            if draw == 0:
                logged = {key: len(values) for key, values in metrics.items()}
            flat = zero_variance_groups(total_rewards(self._gathered_rewards, self.reward_weights), group).cpu()
            flat_groups += int(flat.sum())
            kept_groups += (~flat).view(processes, -1).sum(1)
            mine = flat.view(processes, -1)[self.accelerator.process_index].repeat_interleave(group)
            mine = mine.to(batch["advantages"].device)
            kept.append(select_rows(batch, ~mine))
            set_aside.append(select_rows(batch, mine))
            # Decided from gathered numbers, so every rank stops after the same draw: TRL's rollout is collective.
            if bool((kept_groups >= groups_needed).all()):
                break
        draws = draw + 1
        for key, values in metrics.items():  # TRL's sampling metrics: the first draw's only
            del values[logged.get(key, 0):]
        metrics["zero_variance_fraction"].append(flat_groups / (draws * groups_needed * processes))
        metrics["dynamic_sampling/draws"].append(float(draws))
        metrics["dynamic_sampling/filled_fraction"].append(
            float(kept_groups.clamp(max=groups_needed).sum()) / (groups_needed * processes))
        merged = concatenate(kept + set_aside, self._tokenizer.pad_token_id)
        merged = {key: value[:len(inputs)] for key, value in merged.items()}  # whole groups: kept ones first
        if "num_items_in_batch" in batch:  # GRPO's loss normaliser: the tokens now trained on, over processes
            loss_mask = merged["completion_mask"] * merged.get("tool_mask", 1)
            merged["num_items_in_batch"] = self.accelerator.gather(loss_mask.sum()).sum()
        return merged

    def _drawn_rows(self, prompts: int, draw: int) -> list[dict[str, Any]]:
        """`prompts` training rows at random, each repeated `num_generations` times in a row (a group), seeded by the
        run's seed, step, draw and process: a resumed run draws the same rows, and each process its own."""
        rng = np.random.default_rng([self.args.seed, self.state.global_step, draw, self.accelerator.process_index])
        picks = rng.integers(len(self.train_dataset), size=prompts)
        return [dict(self.train_dataset[int(i)]) for i in picks for _ in range(self.num_generations)]


def with_dynamic_sampling(trainer_class: type, max_draws: int) -> type:
    """`trainer_class` (`GRPOTrainer` or `RLOOTrainer`) with dynamic sampling, at most `max_draws` draws a batch."""
    return type(f"DynamicSampling{trainer_class.__name__}", (DynamicSampling, trainer_class), {"max_draws": max_draws})
