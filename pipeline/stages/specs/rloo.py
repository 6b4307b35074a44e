"""`rloo` stage type: its recipe keys."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.stages.contract import StageType
from pipeline.stages.specs.grpo import GRPOSpec


@dataclass(kw_only=True)
class RLOOSpec(GRPOSpec):
    """REINFORCE leave-one-out with `trl.RLOOTrainer` on prompts (with `answer` for rule rewards); `grpo`'s keys."""

    args_class = "trl.RLOOConfig"
    continues_adapter = False  # `peft.adapter: continue` is untested with RLOOTrainer


STAGE = StageType("rloo", RLOOSpec, "pipeline.stages.rloo")
