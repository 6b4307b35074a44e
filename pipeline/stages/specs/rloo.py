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

    def check(self) -> list[str]:
        problems = super().check()
        if self.tools:  # TRL's RLOOTrainer has no tool loop (GRPOTrainer's `tools`)
            problems.append("tools: TRL's RLOOTrainer cannot run tools; train with tools in a grpo stage "
                            "(its `tools` key), or drop them here")
        if self.environment:
            problems.append("environment: TRL's RLOOTrainer cannot run environments (their methods are tools); "
                            "train in one in a grpo stage, or drop it here")
        return problems


STAGE = StageType("rloo", RLOOSpec, "pipeline.stages.rloo")
