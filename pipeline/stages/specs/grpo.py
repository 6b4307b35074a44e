"""`grpo` stage type: its recipe keys."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.config.specs import DERIVED_PROMPT_FORMATS, PROMPT_FORMATS, RL_HEALTH_CHECKS, RewardsSpec, TrainStageSpec
from pipeline.models.environments import EnvironmentSpec, environment_problems, owns_reward
from pipeline.models.tools import tool_problems
from pipeline.stages.contract import StageType


@dataclass(kw_only=True)
class DynamicSamplingSpec:
    """DAPO's dynamic sampling: groups whose samples all got the same reward are replaced by fresh prompts' groups."""

    max_draws: int  # generation batches drawn at most per training batch, the first included; then topped up

    def check(self, num_generations: int | None) -> list[str]:
        problems = [] if self.max_draws >= 1 else [f"dynamic_sampling.max_draws: must be >= 1, got {self.max_draws}"]
        if isinstance(num_generations, int) and num_generations < 2:  # not given: TRL's default, 8
            problems.append(f"dynamic_sampling: needs args.num_generations >= 2 (a group of one sample has no "
                            f"reward variance to keep), got {num_generations}")
        return problems


@dataclass(kw_only=True)
class GRPOSpec(RewardsSpec, TrainStageSpec):
    """Group-relative policy optimisation with `trl.GRPOTrainer` on prompts (with `answer` for rule rewards)."""

    max_new_tokens_eval: int = 16  # greedy held-out accuracy before/after training, where rows have `answer`
    dynamic_sampling: DynamicSamplingSpec | None = None
    # Functions `package.module:function` the policy may call while it generates (TRL's tool loop: a reply's tool
    # call is run and its answer appended, up to args.max_tool_calling_iterations); each function's signature and
    # docstring (`Args:` lines) describe it to the model. Tool answers are masked out of the loss.
    tools: list[str] = field(default_factory=list)
    tool_timeout: float = 10.0  # seconds a tool call may take; a slower one answers the model with an error
    # `package.module:Class` or {factory: ..., args: {...}}: one instance per rollout, reset with its row; its public
    # methods are tools; a `get_reward()` scores each rollout (`pipeline.models.environments`, TRL's environment_factory)
    environment: str | EnvironmentSpec | None = None
    # Replaces the chat template of the model's tokenizer (saved with this stage's output, so later stages use it):
    # Jinja, or `chatml` (`chatml_compact`: a short tool list), this pipeline's ChatML with tool calls (for a model
    # whose own template shows no tools)
    chat_template: str | None = None

    args_class = "trl.GRPOConfig"
    continues_adapter = True
    learns_from_own_samples = True
    headline_metrics = (("exact match", "initial_eval_accuracy", "eval_accuracy"),
                        ("train reward", "train_reward_first", "train_reward_last"))
    # TRL's logged names. Its clip ratio is 0 by construction at num_iterations 1 (pi_old is pi), so movement is
    # read from the KL to the reference, logged per token when beta != 0.
    health_checks = RL_HEALTH_CHECKS
    health_names = {"reward": "reward", "movement_kl": "kl", "kl_per_token": "kl", "entropy": "entropy",
                    "length": "completions/mean_length", "truncated": "completions/clipped_ratio",
                    "zero_variance": "frac_reward_zero_std", "tool_unanswered": "rewards/tool_call_unanswered/mean",
                    "tool_calls": "tools/call_frequency"}

    def check(self) -> list[str]:
        problems = [] if self.rewards or owns_reward(self.environment) else [
            "`rewards` must list at least one reward (or an `environment` with `get_reward`)"]
        problems += self.reward_problems()
        if self.dynamic_sampling is not None:
            problems += self.dynamic_sampling.check(self.args.get("num_generations"))
        if self.tool_timeout <= 0:
            problems.append(f"tool_timeout: must be > 0 seconds, got {self.tool_timeout}")
        return problems + tool_problems(self.tools) + environment_problems(self.environment)

    def formats(self) -> dict[str, tuple[str, ...]]:
        return PROMPT_FORMATS | DERIVED_PROMPT_FORMATS


STAGE = StageType("grpo", GRPOSpec, "pipeline.stages.grpo")
