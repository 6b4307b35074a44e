"""`reward` stage type: its recipe keys."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config.specs import PREFERENCE_FORMATS, TrainStageSpec
from pipeline.stages.contract import StageType


@dataclass(kw_only=True)
class RewardSpec(TrainStageSpec):
    """Sequence-classification reward model (one score) trained with `trl.RewardTrainer` (Bradley-Terry)."""

    args_class = "trl.RewardConfig"
    model_task = "seq-cls"
    chat_needs_template = False
    preference_data = True
    headline_metrics = (("pair accuracy", "initial_eval_accuracy", "eval_accuracy"),)
    health_checks = TrainStageSpec.health_checks + ("pair_accuracy_near_chance", "margin_collapse")
    health_names = {**TrainStageSpec.health_names, "pair_accuracy": "eval_accuracy", "margin": "eval_margin"}

    def formats(self) -> dict[str, tuple[str, ...]]:
        return PREFERENCE_FORMATS


STAGE = StageType("reward", RewardSpec, "pipeline.stages.reward")
