"""The recipe's `health:` keys: the thresholds of the run-health findings (`pipeline.training.health`) and which
findings fail the stage.

Set per stage (`health:` beside `args:`) or for every training stage (`defaults: {health: {...}}`); a stage's own
keys win. Each threshold's comment is its documentation (the README's thresholds table repeats it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipeline.config.schema import build


@dataclass(kw_only=True)
class HealthSpec:
    """Thresholds of the run-health findings, and the findings that stop the stage."""

    fail_on: list[str] = field(default_factory=list)  # findings that fail the stage instead of only being reported
    min_points: int = 4  # logged rows a trend needs; with fewer, trend findings do not apply
    trend_z: float = 1.0  # a change counts only beyond this many standard errors of the quarter means (step-to-step noise)
    loss_min_drop: float = 0.02  # loss_not_falling: last-quarter mean loss less than this fraction below the first quarter's
    overfit_rise: float = 0.05  # overfitting: held-out loss this fraction above its lowest, while training loss fell
    chance_margin: float = 0.1  # pair_accuracy_near_chance: held-out pair accuracy below 0.5 + this
    min_margin: float = 0.1  # margin_collapse, reward_accuracy_stuck (kto): held-out reward margin below this
    min_pair_accuracy: float = 0.6  # reward_accuracy_stuck: held-out implicit-reward pair accuracy below this
    chosen_logp_drop: float = 1.0  # chosen_logp_falling: chosen log-prob (nats per response) fell by more than this
    still_kl: float = 1e-5  # policy_not_moving: second-half mean KL per token (PPO: old -> new; GRPO/RLOO: to reference) below this
    still_clip: float = 1e-4  # policy_not_moving: ... and second-half clip fraction below this (where logged)
    hacking_accuracy_drop: float = 0.05  # reward_hacking: held-out accuracy (or a reward term's held-out score) fell by at least this while a reward rose; held_out_fell: held-out accuracy fell by at least this
    max_kl: float = 10.0  # kl_past_bound: KL to the reference (nats per response) above this in the last quarter
    kl_growing_from: float = 3.0  # kl_growing: KL (nats per response) rising every quarter, and above this in the last
    min_entropy_ratio: float = 0.1  # entropy_collapse: last-quarter entropy below this fraction of the first quarter's
    max_truncated: float = 0.5  # responses_truncated: share of responses cut at the token limit (last quarter) above this
    length_growth: float = 1.5  # length_growing: response length rising every quarter to this multiple of the first
    max_zero_variance: float = 0.8  # zero_variance_groups: share of sample groups with one reward for all, above this
    min_explained_variance: float = 0.0  # critic_not_learning: second-half critic explained variance at or below this


def health_settings(defaults: dict[str, Any], own: dict[str, Any], where: str, errors: list[str]) -> HealthSpec:
    """A stage's thresholds: `defaults.health`, overridden key by key by the stage's `health`; problems (unknown
    keys with a suggestion, wrong types) appended to `errors`."""
    shared = defaults.get("health") or {}
    merged = {**shared, **own} if isinstance(shared, dict) and isinstance(own, dict) else own
    return build(HealthSpec, merged, where, errors) or HealthSpec()
