"""`kto` stage type: its recipe keys."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config.specs import PREFERENCE_FORMATS, TrainStageSpec
from pipeline.stages.contract import StageType


KTO_FORMATS = {"unpaired": ("prompt", "completion", "label"), **PREFERENCE_FORMATS}


@dataclass(kw_only=True)
class KTOSpec(TrainStageSpec):
    """Kahneman-Tversky optimisation with `trl.KTOTrainer` on completions labelled desirable or not, or preferences."""

    args_class = "trl.KTOConfig"
    preference_data = True  # besides its own unpaired rows
    headline_metrics = (("reward margin", "initial_eval_rewards/margins", "eval_rewards/margins"),)
    # TRL's KTO logs no pair accuracy: `reward_accuracy_stuck` reads the held-out margin instead
    health_checks = TrainStageSpec.health_checks + ("chosen_logp_falling", "reward_accuracy_stuck")
    health_names = {**TrainStageSpec.health_names, "chosen_logp": "logps/chosen", "margin": "eval_rewards/margins"}

    def check(self) -> list[str]:
        """What TRL's KTOTrainer refuses only when the stage starts (its KL estimate pairs rows within a batch)."""
        args = self.args or {}
        if args.get("loss_type", "kto") == "apo_zero_unpaired":  # the one loss without the KL estimate
            return []
        problems = []
        sampling = args.get("train_sampling_strategy", "sequential")
        if sampling != "sequential":
            problems.append("args.train_sampling_strategy: the kto loss needs `sequential` (its KL term pairs each "
                            f"row with its neighbour in the batch), got '{sampling}'")
        batch = args.get("per_device_train_batch_size", 8)
        if isinstance(batch, int) and batch < 2:
            problems.append("args.per_device_train_batch_size: the kto loss needs at least 2 rows a batch (its KL "
                            f"term pairs rows within a batch), got {batch}")
        return problems

    def formats(self) -> dict[str, tuple[str, ...]]:
        return KTO_FORMATS


STAGE = StageType("kto", KTOSpec, "pipeline.stages.kto")
