"""`rloo` stage: REINFORCE leave-one-out with `trl.RLOOTrainer`.

Each prompt gets `num_generations` sampled completions; a completion's advantage is its reward minus
the mean reward of the others for the same prompt (no critic, unlike `ppo`). The KL penalty (`beta`)
is subtracted from the reward itself, not added to the loss as in `grpo`. Everything else is the
`grpo` stage's: the same recipe keys (weighted `rewards`, `answer_extractor`, `dynamic_sampling`), the held-out greedy
accuracy before and after training and the training reward's trend (see `grpo.train_with_rewards`).
"""

from __future__ import annotations

from trl import RLOOTrainer

from pipeline.stages.context import StageContext
from pipeline.stages.specs.rloo import RLOOSpec
from pipeline.stages.grpo import train_with_rewards


def run(spec: RLOOSpec, ctx: StageContext) -> dict[str, float]:
    return train_with_rewards(spec, ctx, RLOOTrainer)
