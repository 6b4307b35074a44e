"""`PPOConfig`: every PPO hyper-parameter, reachable through a recipe's `args` (the `ppo` stage's `args_class`)."""

from __future__ import annotations

from dataclasses import dataclass

from transformers.trainer_utils import SchedulerType


@dataclass
class PPOConfig:
    """Every PPO hyper-parameter, reachable through a recipe's `args`."""

    # --- schedule
    max_steps: int = 40  # PPO steps: each is one rollout batch followed by `ppo_epochs` of updates
    rollout_batch_size: int = 32  # prompts per rollout, per process
    mini_batch_size: int = 8  # rollouts per gradient step
    ppo_epochs: int = 4  # passes over each rollout batch
    learning_rate: float = 1e-4
    lr_scheduler_type: str = "linear"  # any transformers scheduler ("constant", "cosine", ...), stepped once per PPO step
    warmup_steps: int = 0  # PPO steps of linear warm-up
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # gradient clipping (global norm)
    target_kl: float | None = None  # stop a rollout's epochs early once their approximate KL old->new exceeds this
    seed: int = 42
    # --- rollout
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0  # 0 disables top-k filtering
    top_p: float = 1.0
    missing_eos_penalty: float | None = 1.0  # subtracted from the score of responses that never emit EOS
    # --- advantage estimation
    gamma: float = 1.0  # discount; 1.0 is the usual choice for short text episodes
    lam: float = 0.95  # GAE lambda
    whiten_advantages: bool = True  # normalise advantages per rollout batch (masked mean/std over all processes)
    whiten_rewards: bool = False  # normalise the sequence scores per rollout batch before shaping
    # --- losses
    clip_range: float = 0.2  # policy ratio clipping epsilon
    clip_range_value: float = 0.2  # value clipping around the rollout-time value
    vf_coef: float = 0.1
    entropy_coef: float = 0.0
    # --- KL to the reference
    kl_coef: float = 0.05  # beta: initial (or fixed) KL penalty coefficient
    kl_estimator: str = "k1"  # "k1": log pi - log pi_ref; "k3": (rho - 1) - log rho, rho = pi_ref / pi
    adaptive_kl: bool = False  # adapt beta towards kl_target (Ziegler et al.)
    kl_target: float = 1.0  # target sequence-level KL for the adaptive controller
    kl_horizon: int = 10000  # controller horizon, in rollouts
    # --- value head / critic
    value_head_init_std: float = 0.0  # critic on the policy's trunk: 0 starts it at V = 0 (unused with `value_model`)
    # --- bookkeeping
    logging_steps: int = 1
    save_steps: int = 20  # checkpoint every N PPO steps (accelerate state: weights, optimizer, RNG)
    report_to: list[str] | str = "none"  # accelerate trackers: "tensorboard", "wandb", ...
    bf16: bool | None = None  # default: bf16 on GPUs that support it, fp32 elsewhere
    output_dir: str = "ppo"

    def __post_init__(self):
        if self.kl_estimator not in ("k1", "k3"):
            raise ValueError(f"kl_estimator must be 'k1' or 'k3', got {self.kl_estimator!r}")
        if self.rollout_batch_size % self.mini_batch_size:
            raise ValueError(f"rollout_batch_size ({self.rollout_batch_size}) must be a multiple of "
                             f"mini_batch_size ({self.mini_batch_size})")
        for name in ("max_steps", "rollout_batch_size", "mini_batch_size", "ppo_epochs", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        for name in ("learning_rate", "temperature", "clip_range", "clip_range_value"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.target_kl is not None and not self.target_kl > 0:
            raise ValueError(f"target_kl must be > 0 (or null to never stop early), got {self.target_kl}")
        valid = [s.value for s in SchedulerType]
        if self.lr_scheduler_type not in valid:
            raise ValueError(f"lr_scheduler_type must be one of {valid}, got {self.lr_scheduler_type!r}")
