"""`dpo` stage type: its recipe keys."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config.specs import PREFERENCE_FORMATS, TrainStageSpec
from pipeline.stages.contract import StageType


@dataclass(kw_only=True)
class DPOSpec(TrainStageSpec):
    """Direct preference optimisation with `trl.DPOTrainer` against a frozen reference.

    With `peft`, the reference is the same base with the adapter disabled (one copy of the
    weights); without it, TRL keeps a frozen copy of the starting model.
    """

    args_class = "trl.DPOConfig"
    arg_defaults = {"truncation_mode": "keep_end"}  # an over-long pair keeps its replies, not its prompt's start
    continues_adapter = True
    preference_data = True
    # no "before" for pair accuracy: at step 0 the policy is the reference, every implicit reward 0 and every pair
    # a tie, which TRL counts as wrong (0 in every run, whatever the model)
    headline_metrics = (("pair accuracy", None, "eval_rewards/accuracies"),
                        ("reward margin", "initial_eval_rewards/margins", "eval_rewards/margins"))
    health_checks = TrainStageSpec.health_checks + ("chosen_logp_falling", "reward_accuracy_stuck")
    health_names = {**TrainStageSpec.health_names, "chosen_logp": "logps/chosen",
                    "pair_accuracy": "eval_rewards/accuracies", "margin": "eval_rewards/margins"}

    def formats(self) -> dict[str, tuple[str, ...]]:
        return PREFERENCE_FORMATS


STAGE = StageType("dpo", DPOSpec, "pipeline.stages.dpo")
