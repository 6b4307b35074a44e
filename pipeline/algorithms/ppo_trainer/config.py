"""`PPOConfig`: every PPO hyper-parameter, reachable through a recipe's `args` (the `ppo` stage's `args_class`)."""

from __future__ import annotations

from dataclasses import dataclass

KL_ESTIMATORS = ("k1", "k3")
ADVANTAGE_ESTIMATORS = ("gae", "rloo", "reinforce_plus_plus", "grpo")
REWARD_NORMALIZATIONS = ("running", "batch", "none")
REWARD_SCALINGS = ("group", "batch", "none")
STD_SCALED = ("grpo",)  # estimators whose group-centred scores are then divided by a std (`scale_rewards`)


@dataclass
class PPOConfig:
    """Every PPO hyper-parameter, reachable through a recipe's `args`."""

    # --- schedule
    max_steps: int = 40  # PPO steps: each is one rollout batch followed by `ppo_epochs` of updates
    rollout_batch_size: int = 32  # responses per rollout, per process (rollout_batch_size / samples_per_prompt prompts)
    mini_batch_size: int = 8  # responses per gradient step
    ppo_epochs: int = 4  # passes over each rollout batch
    # The policy's; default 1e-4 when it trains LoRA adapters, 1e-5 when it trains every weight (full fine-tuning at
    # 1e-4 lowered held-out accuracy on the facts task: README, "RL on work it was not tuned for")
    learning_rate: float | None = None
    lr_scheduler_type: str = "linear"  # any transformers scheduler ("constant", "cosine", ...), stepped once per PPO step
    warmup_steps: int = 0  # PPO steps of linear learning-rate warm-up
    weight_decay: float = 0.0  # AdamW weight decay, policy and critic
    max_grad_norm: float | None = 1.0  # the policy's gradients clipped to this norm (0 or null: not clipped)
    target_kl: float | None = None  # stop a rollout's epochs early once their approximate KL old->new exceeds this
    seed: int = 42  # prompt order and sampling, offset per process (the pipeline passes the recipe's `seed`)
    # --- rollout
    max_new_tokens: int = 16  # longest response sampled; one that stops here without EOS gets `missing_eos_penalty`
    temperature: float = 1.0  # sampling temperature of the rollouts (log-probs are taken at this temperature)
    top_k: int = 0  # 0 disables top-k filtering
    top_p: float = 1.0  # nucleus sampling; 1.0 disables it
    missing_eos_penalty: float | None = 1.0  # subtracted from the score of responses that never emit EOS
    samples_per_prompt: int | None = None  # responses sampled per prompt (a group); default 1 for gae, 4 for the others
    # Dynamic sampling (DAPO, Yu et al., 2025): a group whose samples all got the same score has no advantage under a
    # group baseline; drop it and sample more prompts until the batch is full, at most this many rollouts per step
    # (then the batch is topped up with dropped groups). null: off. Critic-free estimators only.
    dynamic_sampling_max_draws: int | None = None
    # --- rewards: the sequence score s(x, y), before the KL penalty
    # "running": (s - mean) / std over every score so far (checkpointed); "batch": over this rollout's; "none": raw.
    reward_normalization: str = "running"
    reward_clip: float | None = 5.0  # normalised scores clipped to [-reward_clip, reward_clip] (0 or null: not clipped)
    # --- advantage estimation
    # "gae": a critic and GAE (PPO proper); critic-free, from groups of `samples_per_prompt` samples: "rloo"
    # (leave-one-out baseline), "reinforce_plus_plus" (group-mean baseline, batch-whitened), "grpo" (group
    # mean and std). In every estimator the KL penalty is a per-token reward; the critic-free ones take
    # each token's advantage as its reward-to-go.
    advantage_estimator: str = "gae"
    # grpo only: its group-centred scores divided by the std of the group ("group", GRPO as published and TRL's
    # default), of the whole batch ("batch") or not at all ("none"). "batch": dividing by a group's own std turned
    # small score differences between near misses into full-size advantages and hacked the reward model (README).
    scale_rewards: str = "batch"
    gamma: float = 1.0  # discount; 1.0 is the usual choice for short text episodes
    lam: float = 0.95  # GAE lambda
    whiten_advantages: bool = True  # gae and reinforce_plus_plus: advantages whitened over the global rollout batch
    # --- losses
    clip_range: float = 0.2  # policy ratio clipping epsilon
    clip_range_value: float = 0.2  # value clipping around the rollout-time value
    vf_coef: float = 0.1  # weight of the value loss beside the policy loss
    entropy_coef: float = 0.0  # weight of an entropy bonus (0: none, and no entropy graph is built)
    # --- KL to the reference
    kl_coef: float = 0.05  # beta: initial (or fixed) KL penalty coefficient
    kl_estimator: str = "k1"  # "k1": log pi - log pi_ref; "k3": (rho - 1) - log rho, rho = pi_ref / pi
    adaptive_kl: bool = False  # adapt beta towards kl_target (Ziegler et al.)
    kl_target: float = 1.0  # target sequence-level KL for the adaptive controller
    kl_horizon: int = 10000  # controller horizon, in rollouts
    # --- critic (gae only), trained beside the policy with its own learning rate and gradient clipping, as
    # OpenRLHF, verl and NeMo-RL do: one clip over both let a fresh critic's large gradients shrink the policy's step
    critic_learning_rate: float | None = None  # default: 10 x the policy's (verl's default ratio; OpenRLHF's is 9x)
    critic_max_grad_norm: float | None = 1.0  # the critic's gradients clipped to this norm (0 or null: not clipped)
    critic_warmup_steps: int = 0  # first PPO steps in which only the critic learns (the policy is frozen)
    value_head_init_std: float = 0.0  # critic on the policy's trunk: 0 starts it at V = 0 (unused with `value_model`)
    # --- bookkeeping
    logging_steps: int = 1  # log every N PPO steps
    save_steps: int = 20  # checkpoint every N PPO steps (accelerate state: weights, optimizer, RNG)
    report_to: list[str] | str = "none"  # accelerate trackers: "tensorboard", "wandb", ...
    bf16: bool | None = None  # default: bf16 on GPUs that support it, fp32 elsewhere
    # recompute each layer's activations in the backward pass instead of keeping them (policy and critic): a LoRA
    # update of SmolLM2-135M on 8 x 450 tokens kept 8.5 GB per forward pass without it, 17 GB for policy and critic
    activation_checkpointing: bool = False
    output_dir: str = "ppo"

    @property
    def uses_critic(self) -> bool:
        return self.advantage_estimator == "gae"

    @property
    def prompts_per_rollout(self) -> int:
        return self.rollout_batch_size // self.samples_per_prompt

    def __post_init__(self):
        if self.samples_per_prompt is None:
            self.samples_per_prompt = 1 if self.uses_critic else 4
        for name, choices in (("kl_estimator", KL_ESTIMATORS), ("advantage_estimator", ADVANTAGE_ESTIMATORS),
                              ("reward_normalization", REWARD_NORMALIZATIONS),
                              ("scale_rewards", REWARD_SCALINGS)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {list(choices)}, got {getattr(self, name)!r}")
        for problem in self.estimator_problems():
            raise ValueError(problem)
        if self.rollout_batch_size % self.mini_batch_size:
            raise ValueError(f"rollout_batch_size ({self.rollout_batch_size}) must be a multiple of "
                             f"mini_batch_size ({self.mini_batch_size})")
        if self.rollout_batch_size % self.samples_per_prompt:
            raise ValueError(f"rollout_batch_size ({self.rollout_batch_size}) must be a multiple of "
                             f"samples_per_prompt ({self.samples_per_prompt}): a rollout holds whole groups")
        for name in ("max_steps", "rollout_batch_size", "mini_batch_size", "ppo_epochs", "max_new_tokens",
                     "samples_per_prompt"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.critic_warmup_steps < 0:
            raise ValueError(f"critic_warmup_steps must be >= 0, got {self.critic_warmup_steps}")
        for name in ("learning_rate", "critic_learning_rate"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0 (or null for the default), got {getattr(self, name)}")
        for name in ("temperature", "clip_range", "clip_range_value"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.target_kl is not None and not self.target_kl > 0:
            raise ValueError(f"target_kl must be > 0 (or null to never stop early), got {self.target_kl}")
        for name in ("max_grad_norm", "critic_max_grad_norm", "reward_clip"):
            if getattr(self, name) is not None and not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0 (0 or null: off), got {getattr(self, name)}")
        from transformers.trainer_utils import SchedulerType  # lazy: reading a recipe's PPO spec needs no transformers

        valid = [s.value for s in SchedulerType]
        if self.lr_scheduler_type not in valid:
            raise ValueError(f"lr_scheduler_type must be one of {valid}, got {self.lr_scheduler_type!r}")

    def learning_rates(self, adapters: bool) -> tuple[float, float]:
        """(policy, critic) learning rates, the defaults resolved for a model that trains LoRA adapters or not."""
        policy = self.learning_rate or (1e-4 if adapters else 1e-5)
        return policy, self.critic_learning_rate or 10 * policy

    def estimator_problems(self) -> list[str]:
        """What does not fit `advantage_estimator` (`validate` reports it, with the keys, before training)."""
        problems = []
        if not self.uses_critic and self.samples_per_prompt < 2:
            problems.append(f"advantage_estimator {self.advantage_estimator!r} baselines each sample against the "
                            "other samples of its prompt: set samples_per_prompt >= 2")
        if self.dynamic_sampling_max_draws is not None:
            if self.dynamic_sampling_max_draws < 1:
                problems.append("dynamic_sampling_max_draws must be >= 1 (or null to turn dynamic sampling off), "
                                f"got {self.dynamic_sampling_max_draws}")
            if self.uses_critic:
                problems.append("dynamic_sampling_max_draws drops groups whose samples scored alike, which leaves no "
                                "gradient only under a group baseline: use advantage_estimator rloo, "
                                "reinforce_plus_plus or grpo")
        return problems


CRITIC_KEYS = ("critic_learning_rate", "critic_max_grad_norm", "critic_warmup_steps", "vf_coef", "clip_range_value",
               "lam", "value_head_init_std")  # meaningful only with advantage_estimator "gae"
