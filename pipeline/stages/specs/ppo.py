"""`ppo` stage type: its recipe keys."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.algorithms.ppo_trainer.config import CRITIC_KEYS, STD_SCALED
from pipeline.config.specs import DERIVED_PROMPT_FORMATS, PROMPT_FORMATS, RL_HEALTH_CHECKS, RewardTermSpec, RewardsSpec, TrainStageSpec
from pipeline.stages.contract import StageType


@dataclass(kw_only=True)
class PPOSpec(RewardsSpec, TrainStageSpec):
    """RLHF with the project's own PPO: critic, GAE, clipping, KL to the reference.

    The trainer is `pipeline.algorithms.ppo_trainer`; `args` are fields of its `PPOConfig`."""

    reward_model: str | None = None  # shorthand for `rewards: [{reward_model: NAME}]`
    # The critic's starting point (TRL's `value_model`): a reward-model stage, folder or Hub id whose trunk and
    # score head become the critic (InstructGPT); it must share the policy's tokenizer. Default: the policy's
    # own trunk with a fresh value head (a LoRA adapter on the shared base when `peft` is set).
    value_model: str | None = None
    # "gae": a critic and GAE; critic-free, from groups of samples of each prompt: "rloo", "reinforce_plus_plus",
    # "grpo" (PPOConfig's fields of these names document them)
    advantage_estimator: str = "gae"
    samples_per_prompt: int | None = None  # responses per prompt; default 1 for gae, 4 for the critic-free estimators

    ref_fields = ("model", "value_model")
    args_class = "pipeline.algorithms.ppo_trainer.config.PPOConfig"
    # A PPO step is a whole rollout and its updates, so a recipe's `defaults:` sized for Trainer steps (save_steps,
    # logging_steps, max_steps, warmup_steps) or for supervised learning rates stay with the Trainer stages.
    shared_defaults = ("seed", "report_to", "bf16", "weight_decay", "lr_scheduler_type", "max_grad_norm",
                       "activation_checkpointing")
    zero3_unsupported = "its rollouts would gather the sharded weights for every generated token"
    learns_from_own_samples = True
    headline_metrics = (("exact match", "initial_eval_accuracy", "eval_accuracy"),
                        ("reward", "initial_eval_reward/*", "eval_reward/*"), ("KL", None, "eval_kl"))
    # The trainer's per-step names (pipeline.algorithms.ppo_trainer.trainer); `kl` is per response, and the
    # truncated share is 1 - eos_fraction
    health_checks = RL_HEALTH_CHECKS + ("critic_not_learning",)
    health_names = {"reward": "reward", "movement_kl": "approx_kl", "movement_clip": "clip_fraction", "kl": "kl",
                    "entropy": "entropy", "length": "response_length", "finished": "eos_fraction",
                    "zero_variance": "zero_variance_fraction", "explained_variance": "explained_variance"}

    def reward_terms(self) -> list[RewardTermSpec]:
        own = [RewardTermSpec(reward_model=self.reward_model)] if self.reward_model else []
        return own + list(self.rewards)

    def config_keys(self) -> dict[str, Any]:
        return {"advantage_estimator": self.advantage_estimator, "samples_per_prompt": self.samples_per_prompt}

    def check(self) -> list[str]:
        problems = [] if self.reward_terms() else ["give `reward_model` or `rewards`"]
        problems += [f"args.{key}: a key of the stage itself: write `{key}: ...` beside `args`"
                     for key in self.config_keys() if key in self.args]
        if self.advantage_estimator != "gae":
            critic_keys = [f"args.{k}" for k in self.args if k in CRITIC_KEYS] + ["value_model"] * bool(self.value_model)
            if critic_keys:
                problems.append(f"advantage_estimator {self.advantage_estimator!r} trains no critic, so "
                                f"{', '.join(critic_keys)} would do nothing: remove them, or use advantage_estimator 'gae'")
        if "scale_rewards" in self.args and self.advantage_estimator not in STD_SCALED:
            problems.append(f"args.scale_rewards scales GRPO's advantages: it does nothing with advantage_estimator "
                            f"{self.advantage_estimator!r}; remove it, or use advantage_estimator 'grpo'")
        return problems + self.reward_problems()

    def formats(self) -> dict[str, tuple[str, ...]]:
        return PROMPT_FORMATS | DERIVED_PROMPT_FORMATS


STAGE = StageType("ppo", PPOSpec, "pipeline.stages.ppo")
