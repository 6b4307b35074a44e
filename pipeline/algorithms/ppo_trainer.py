"""PPO for RLHF, read top to bottom: rollout -> score -> KL-shaped reward -> GAE -> clipped updates.

TRL removed its `PPOTrainer` in 2026; this is the project's own, in the spirit of CleanRL's
`ppo.py` and of "The N Implementation Details of RLHF with PPO" (Huang et al., 2024).

One PPO step, for a batch of prompts x:
  1. rollout     y ~ pi_theta(.|x)  (sampling with a KV cache, stopped at EOS or `max_new_tokens`)
  2. evaluation  s(x, y) = sum_k w_k R_k(x, y)  (reward-model stages and rule rewards),
                 minus `missing_eos_penalty` when y never ended
  3. KL shaping  r_t = -beta * kl_t  for every response token t, plus s(x, y) on the last one,
                 kl_t = log pi(y_t) - log pi_ref(y_t) (k1) or (rho - 1) - log rho, rho = pi_ref/pi (k3)
  4. GAE         delta_t = r_t + gamma V(t+1) - V(t);  A_t = delta_t + gamma lam A(t+1);  R_t = A_t + V(t)
  5. optimise    for `ppo_epochs` x minibatches (stopping early once the approximate KL passes `target_kl`):
                   L_pi = E[max(-A rho_t, -A clip(rho_t, 1-eps, 1+eps))],  rho_t = pi_theta/pi_old
                   L_V  = 0.5 E[max((V - R)^2, (V_old + clip(V - V_old, -eps_v, eps_v) - R)^2)]
                   L    = L_pi + vf_coef L_V - entropy_coef H
  6. KL control  beta fixed, or adapted towards `kl_target` (Ziegler et al., 2019)

On-policy by construction: every forward pass (rollout scoring, reference, updates) sees the same ids,
attention mask and positions that `generate` saw (prompts rendered by `pipeline.data.prompts`, the mask carried
with the rollout, never rebuilt from pad ids), and dropout is off in every model, so before the first
update pi_theta / pi_old is exactly 1.

Memory: with LoRA, policy and critic are two adapters on one shared base and the reference is
that base with adapters disabled: one copy of the base weights (plus the reward model). Without
LoRA, the critic is a separate copy of the policy's trunk and the reference a frozen copy. The critic
may instead start from a reward model (`value_model`), as in InstructGPT. Logits are computed only at
response positions, log-probs only for the sampled tokens, and the critic runs the trunk without the LM head.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import get_scheduler
from transformers.trainer_utils import SchedulerType
from trl.trainer.utils import disable_dropout_in_model, entropy_from_logits, selective_log_softmax

from pipeline.data.answers import AnswerCheck, answer_check
from pipeline.data.prompts import encode_prompts
from pipeline.models.loading import process_defaults, use_bf16
from pipeline.models.reward_functions import exact_match_reward
from pipeline.training.trainers import TrainingDiverged


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


# ------------------------------------------------------------------------------ the maths
def identity(x: torch.Tensor) -> torch.Tensor:
    return x


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True,
                  all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] = identity) -> torch.Tensor:
    """(x - mean) / std over the unmasked entries (unbiased variance); masked entries become 0.

    `all_reduce_sum` sums the statistics over processes, so every rank whitens with the global batch's.
    """
    sums = all_reduce_sum(torch.stack([(x * mask).sum(), (x * x * mask).sum(), mask.sum()]))
    count = sums[2].clamp(min=1)
    mean = sums[0] / count
    var = (sums[1] / count - mean ** 2).clamp(min=0) * count / (count - 1).clamp(min=1)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask


def kl_per_token(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token KL(pi || pi_ref) estimate from samples of pi (Schulman, "Approximating KL divergence")."""
    log_ratio = logprobs - ref_logprobs  # log pi - log pi_ref
    if estimator == "k1":
        return log_ratio
    # k3: unbiased and always >= 0; with rho = pi_ref / pi, (rho - 1) - log rho
    return torch.expm1(-log_ratio) + log_ratio


def shaped_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """r_t = -beta kl_t on every response token, plus the sequence score on its last token."""
    rewards = -kl_coef * kl * mask
    last = (mask.sum(1).long() - 1).clamp(min=0)
    rewards[torch.arange(len(scores)), last] += scores
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Generalised advantage estimation over response tokens; returns (advantages, returns).

    Tokens after the response ends (mask 0) contribute nothing: V(t+1) past the end is 0.
    """
    advantages = torch.zeros_like(rewards)
    next_advantage = torch.zeros(rewards.shape[0], device=rewards.device)
    next_value = torch.zeros_like(next_advantage)
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        next_value = values[:, t] * mask[:, t]
        advantages[:, t] = next_advantage
    return advantages, (advantages + values) * mask


def policy_loss(logprobs, old_logprobs, advantages, mask, clip_range: float):
    """Clipped surrogate; returns (loss, clip fraction, approximate KL old->new)."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    clip_fraction = masked_mean((clipped > unclipped).float(), mask)
    approx_kl = masked_mean(0.5 * log_ratio ** 2, mask)
    return loss, clip_fraction, approx_kl


def value_loss(values, old_values, returns, mask, clip_range_value: float):
    """Clipped value loss; returns (loss, fraction of tokens where the clipped term was larger)."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    unclipped_error = (values - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(unclipped_error, clipped_error), mask)
    return loss, masked_mean((clipped_error > unclipped_error).float(), mask)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var[R - V] / Var[R]: 1 is a perfect critic, 0 no better than a constant."""
    var_returns = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    residual = returns - values
    var_residual = masked_mean((residual - masked_mean(residual, mask)) ** 2, mask)
    return float(1 - var_residual / var_returns) if var_returns > 0 else float("nan")


class AdaptiveKLController:
    """beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon)  (Ziegler et al., 2019)."""

    def __init__(self, kl_coef: float, target: float, horizon: int):
        self.value, self.target, self.horizon = kl_coef, target, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        error = max(min(current_kl / self.target - 1, 0.2), -0.2)
        self.value *= 1 + error * n_steps / self.horizon


# --------------------------------------------------------------------------- the models
def decoder_trunk(causal_lm: nn.Module) -> nn.Module:
    """The transformer of a causal LM (or of a PeftModel around one) without its LM head."""
    model = causal_lm.get_base_model() if hasattr(causal_lm, "get_base_model") else causal_lm
    return getattr(model, model.base_model_prefix)


class ActorCritic(nn.Module):
    """Policy logits and per-token values from one forward call (one call keeps DDP happy).

    LoRA mode (`critic_trunk` None): `policy` is a PeftModel with adapters "policy" and "value"; the critic
    runs the same base's trunk under the "value" adapter, and the reference is the base with adapters off.
    Otherwise `critic_trunk` is a separate transformer: a copy of the policy's, or a reward model's.
    """

    def __init__(self, policy: nn.Module, critic_trunk: nn.Module | None, value_head: nn.Module):
        super().__init__()
        self.policy = policy
        self.critic_trunk = critic_trunk
        self.value_head = value_head
        for module in (policy, critic_trunk):  # PPO's ratio must be exactly 1 before the first update
            if module is not None:
                disable_dropout_in_model(module)
        if self.uses_adapters:
            # peft leaves the adapter it added last frozen; the optimizer is built from what is trainable now, so
            # without this the critic's adapter got gradients that nothing applied or cleared
            self.use_adapter("policy")

    @classmethod
    def with_new_head(cls, policy: nn.Module, critic_trunk: nn.Module | None, hidden_size: int, init_std: float):
        head = nn.Linear(hidden_size, 1)
        nn.init.normal_(head.weight, std=init_std)
        nn.init.zeros_(head.bias)
        return cls(policy, critic_trunk, head)

    @property
    def uses_adapters(self) -> bool:
        return self.critic_trunk is None

    def use_adapter(self, name: str) -> None:
        """Activate one adapter; keep both trainable (peft freezes the inactive one)."""
        self.policy.base_model.set_adapter(name)
        for param_name, param in self.policy.named_parameters():
            if "lora_" in param_name:
                param.requires_grad_(True)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                logits_to_keep: int):
        """(logits, values) at the last `logits_to_keep` positions only: the ones that predict the response."""
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        if self.uses_adapters:
            self.use_adapter("policy")
        logits = self.policy(**inputs, logits_to_keep=logits_to_keep).logits
        if self.uses_adapters:
            self.use_adapter("value")
            hidden = decoder_trunk(self.policy)(**inputs).last_hidden_state
            self.use_adapter("policy")
        else:
            hidden = self.critic_trunk(**inputs).last_hidden_state
        hidden = hidden[:, -logits_to_keep:]
        return logits, self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1)


# --------------------------------------------------------------------------- the trainer
@dataclass
class Rollout:
    """One batch of experience; every per-token tensor is aligned with `response` positions."""

    prompts: list[Any]
    rows: dict[str, list]
    query: torch.Tensor  # left-padded prompt ids
    query_mask: torch.Tensor  # their attention mask, from tokenization (never rebuilt from pad ids)
    response: torch.Tensor  # generated ids, padded after EOS
    mask: torch.Tensor  # 1 for response tokens up to and including EOS
    logprobs: torch.Tensor = field(default=None)
    ref_logprobs: torch.Tensor = field(default=None)
    values: torch.Tensor = field(default=None)
    scores: torch.Tensor = field(default=None)
    advantages: torch.Tensor = field(default=None)
    returns: torch.Tensor = field(default=None)

    def sequence_inputs(self, idx: torch.Tensor | slice = slice(None)) -> dict[str, Any]:
        """input_ids, attention_mask, position_ids of query + response exactly as `generate` built them."""
        query, response = self.query[idx], self.response[idx]
        input_ids = torch.cat([query, response], dim=1)
        # generate() attends to every new token, the padding after an EOS included; that padding comes after
        # the response, so no response token sees it, and the losses mask it.
        attention_mask = torch.cat([self.query_mask[idx], torch.ones_like(response)], dim=1)
        position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)  # left padding must not shift positions
        return dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    logits_to_keep=response.shape[1] + 1)  # logits at t predict token t+1


class PPOTrainer:
    """Runs PPO on prompt rows (`prompt` plus any columns the reward functions use)."""

    def __init__(self, config: PPOConfig, model: ActorCritic, tokenizer, prompts_dataset,
                 reward_functions: list[Callable], reward_weights: list[float], reward_names: list[str],
                 ref_model: nn.Module | None = None,
                 callbacks: list[Callable[[int, dict], None]] | None = None,
                 is_correct: AnswerCheck = answer_check()):
        self.config = config
        bf16 = use_bf16() if config.bf16 is None else config.bf16
        report_to = None if config.report_to in ("none", ["none"], []) else config.report_to
        # The same process setup the runner and the Trainers use: CPU-only DDP over gloo needs `cpu`.
        self.accelerator = Accelerator(mixed_precision="bf16" if bf16 else "no", log_with=report_to,
                                       project_dir=config.output_dir, cpu=process_defaults()["use_cpu"])
        deepspeed = self.accelerator.state.deepspeed_plugin
        if deepspeed is not None and deepspeed.zero_stage == 3:
            raise ValueError("PPO supports DeepSpeed ZeRO stages 0-2, not 3: rollouts would gather the sharded "
                             "weights for every generated token; use deepspeed_zero2.yaml or LoRA under DDP")
        if deepspeed is not None:  # no dataloader is prepared, so DeepSpeed cannot infer its batch sizes
            # (and an earlier stage's Trainer may have filled them in for its own batches)
            deepspeed.deepspeed_config.update(
                train_micro_batch_size_per_gpu=config.mini_batch_size, gradient_accumulation_steps=1,
                train_batch_size=config.mini_batch_size * self.accelerator.num_processes)
        set_seed(config.seed, device_specific=True)  # each rank samples different responses
        self.tokenizer = tokenizer
        self.dataset = prompts_dataset
        self.reward_functions, self.reward_weights, self.reward_names = reward_functions, reward_weights, reward_names
        self.is_correct = is_correct  # how held-out accuracy reads answers
        self.callbacks = callbacks or []
        trainable = [p for p in model.parameters() if p.requires_grad]
        # fused: one kernel for all parameters, on CPU too (measured 5x faster per step than the default loop)
        optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay, fused=True)
        scheduler = get_scheduler(config.lr_scheduler_type, optimizer, num_warmup_steps=config.warmup_steps,
                                  num_training_steps=config.max_steps)
        self.model, self.optimizer, self.scheduler = self.accelerator.prepare(model, optimizer, scheduler)
        if ref_model is not None:
            disable_dropout_in_model(ref_model)
            self.ref_model = ref_model.to(self.accelerator.device).eval()
        else:
            self.ref_model = None
        self.kl_controller = AdaptiveKLController(config.kl_coef, config.kl_target, config.kl_horizon)
        self.step = 0
        self.log_history: list[dict[str, float]] = []
        # Each rank draws its own prompts; its generator's state is checkpointed per rank.
        self.generator = torch.Generator().manual_seed(config.seed + self.accelerator.process_index)
        if report_to:
            self.accelerator.init_trackers("ppo", config={k: v for k, v in asdict(config).items()
                                                          if isinstance(v, (int, float, str, bool))})

    @property
    def unwrapped(self) -> ActorCritic:
        return self.accelerator.unwrap_model(self.model)

    # ---------------------------------------------------------------------- 1. rollout
    def sample_prompts(self) -> tuple[list[Any], dict[str, list]]:
        indices = torch.randint(len(self.dataset), (self.config.rollout_batch_size,), generator=self.generator)
        rows = self.dataset.select(indices.tolist())
        columns = {name: list(rows[name]) for name in rows.column_names}
        return columns["prompt"], columns

    @torch.no_grad()
    def generate_responses(self, prompts: list[Any], rows: dict[str, list], do_sample: bool) -> Rollout:
        """Responses from the current policy (with a KV cache) to prompts rendered as training saw them."""
        tokenizer, policy, device = self.tokenizer, self.unwrapped, self.accelerator.device
        query, query_mask = (t.to(device) for t in encode_prompts(tokenizer, prompts))
        if policy.uses_adapters:
            policy.use_adapter("policy")
        policy.eval()
        sampling = dict(do_sample=True, temperature=self.config.temperature, top_k=self.config.top_k,
                        top_p=self.config.top_p) if do_sample else dict(do_sample=False)
        output = policy.policy.generate(input_ids=query, attention_mask=query_mask,
                                        max_new_tokens=self.config.max_new_tokens, use_cache=True,
                                        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                        **sampling)
        response = output[:, query.shape[1]:]
        # Everything after the first EOS is padding; the EOS itself belongs to the response.
        is_eos = response == tokenizer.eos_token_id
        after_eos = (torch.cumsum(is_eos, dim=1) - is_eos.long()) > 0
        return Rollout(prompts, rows, query, query_mask, response.masked_fill(after_eos, tokenizer.pad_token_id),
                       (~after_eos).float())

    def rollout(self) -> Rollout:
        prompts, rows = self.sample_prompts()
        return self.generate_responses(prompts, rows, do_sample=True)

    # ------------------------------------------------------------ log-probs and values
    def policy_outputs(self, model, rollout: Rollout, idx: torch.Tensor | slice = slice(None),
                       with_entropy: bool = False, temperature: float | None = None):
        """(log pi(y_t), V(t), entropy or None) at the response positions, at the sampling temperature by default."""
        inputs = rollout.sequence_inputs(idx)
        logits, values = model(**inputs)
        logits = logits[:, :-1].float() / (temperature or self.config.temperature)
        logprobs = selective_log_softmax(logits, rollout.response[idx])
        entropy = None
        if with_entropy:  # a graph through the entropy only when it is part of the loss
            with torch.set_grad_enabled(torch.is_grad_enabled() and self.config.entropy_coef != 0):
                entropy = entropy_from_logits(logits)
        return logprobs, values[:, :-1], entropy

    @torch.no_grad()
    def reference_logits(self, rollout: Rollout) -> torch.Tensor:
        """The reference's logits at the response positions (the frozen copy, or the base with adapters off)."""
        inputs = rollout.sequence_inputs()
        if self.ref_model is not None:
            logits = self.ref_model(**inputs).logits
        else:
            policy = self.unwrapped.policy
            with policy.disable_adapter():
                logits = policy(**inputs).logits
        return logits[:, :-1].float()

    def reference_logprobs(self, rollout: Rollout) -> torch.Tensor:
        return selective_log_softmax(self.reference_logits(rollout) / self.config.temperature, rollout.response)

    # ------------------------------------------------------------------- 2. evaluation
    def completions(self, rollout: Rollout) -> list[Any]:
        texts = self.tokenizer.batch_decode(rollout.response, skip_special_tokens=True)
        return [[{"role": "assistant", "content": t}] if isinstance(p, list) else t
                for p, t in zip(rollout.prompts, texts)]

    def term_scores(self, rollout: Rollout) -> dict[str, torch.Tensor]:
        """Each reward term's (unweighted) score of every response."""
        completions = self.completions(rollout)
        extra = {k: v for k, v in rollout.rows.items() if k != "prompt"}
        return {name: torch.tensor(function(prompts=rollout.prompts, completions=completions, **extra),
                                   dtype=torch.float32)
                for name, function in zip(self.reward_names, self.reward_functions)}

    def score(self, rollout: Rollout) -> torch.Tensor:
        """s(x, y): the weighted sum of reward terms, minus the penalty for a response without EOS."""
        terms = self.term_scores(rollout)
        scores = sum(w * terms[name] for name, w in zip(self.reward_names, self.reward_weights))
        if self.config.missing_eos_penalty is not None:
            ended = (rollout.response == self.tokenizer.eos_token_id).any(dim=1).cpu()
            scores = scores - self.config.missing_eos_penalty * (~ended).float()
        return scores.to(self.accelerator.device)

    # ------------------------------------------------- 3.-4. KL shaping and advantages
    @torch.no_grad()
    def make_experience(self) -> tuple[Rollout, dict[str, float]]:
        started = time.time()
        rollout = self.rollout()
        generation_seconds = time.time() - started
        rollout.logprobs, values, _ = self.policy_outputs(self.unwrapped, rollout)
        rollout.ref_logprobs = self.reference_logprobs(rollout)
        rollout.scores = self.score(rollout)
        mask = rollout.mask
        kl = kl_per_token(rollout.logprobs, rollout.ref_logprobs, self.config.kl_estimator) * mask
        scores = rollout.scores
        if self.config.whiten_rewards:
            scores = masked_whiten(scores, torch.ones_like(scores), shift_mean=False, all_reduce_sum=self.all_reduce_sum)
        rewards = shaped_rewards(scores, kl, mask, self.kl_controller.value)
        rollout.values = values * mask
        rollout.advantages, rollout.returns = gae(rewards, rollout.values, mask, self.config.gamma, self.config.lam)
        if self.config.whiten_advantages:
            rollout.advantages = masked_whiten(rollout.advantages, mask, all_reduce_sum=self.all_reduce_sum)
        stats = {
            "reward": self.gather_mean(rollout.scores),
            "kl": self.gather_mean(kl.sum(1)),
            "kl_coef": self.kl_controller.value,
            "response_length": self.gather_mean(mask.sum(1)),
            "eos_fraction": self.gather_mean((rollout.response == self.tokenizer.eos_token_id).any(1).float()),
            "time/generation_s": generation_seconds,
        }
        return rollout, stats

    def all_reduce_sum(self, x: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(x, reduction="sum") if self.accelerator.num_processes > 1 else x

    def gather_mean(self, x: torch.Tensor) -> float:
        return float(self.accelerator.gather(x.detach().float().reshape(-1)).mean())

    # ------------------------------------------------------------------- 5. optimise
    def optimise(self, rollout: Rollout) -> dict[str, float]:
        config = self.config
        # Dropout is disabled in every model; eval mode keeps anything else mode-dependent (MoE router
        # jitter, for one) identical between rollout and update, so rho_t starts at exactly 1.
        self.model.eval()
        names = ("policy_loss", "value_loss", "entropy", "clip_fraction", "value_clip_fraction", "approx_kl")
        totals = torch.zeros(len(names), device=rollout.mask.device)
        updates = epochs = 0
        started = time.time()
        for _ in range(config.ppo_epochs):
            epoch_kl = torch.zeros((), device=rollout.mask.device)
            order = torch.randperm(config.rollout_batch_size, generator=self.generator)
            for start in range(0, config.rollout_batch_size, config.mini_batch_size):
                idx = order[start:start + config.mini_batch_size].to(rollout.mask.device)
                mask = rollout.mask[idx]
                logprobs, values, entropy = self.policy_outputs(self.model, rollout, idx, with_entropy=True)
                pg_loss, clip_fraction, approx_kl = policy_loss(logprobs, rollout.logprobs[idx],
                                                                rollout.advantages[idx], mask, config.clip_range)
                vf_loss, vf_clip = value_loss(values, rollout.values[idx], rollout.returns[idx], mask,
                                              config.clip_range_value)
                entropy = masked_mean(entropy, mask)
                loss = pg_loss + config.vf_coef * vf_loss - config.entropy_coef * entropy
                if not torch.isfinite(loss):
                    raise TrainingDiverged(f"PPO loss became {loss.item()} at step {self.step + 1}; "
                                                "lower the learning rate or check the reward functions")
                self.accelerator.backward(loss)
                self.accelerator.clip_grad_norm_(self.model.parameters(), config.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad()
                totals += torch.stack([pg_loss, vf_loss, entropy, clip_fraction, vf_clip, approx_kl]).detach()
                epoch_kl += approx_kl.detach()
                updates += 1
            epochs += 1
            minibatches = config.rollout_batch_size // config.mini_batch_size
            # the same decision on every rank: the epoch's approximate KL averaged over all of them
            if config.target_kl is not None and float(self.all_reduce_sum(epoch_kl)) / (
                    minibatches * self.accelerator.num_processes) > config.target_kl:
                break
        self.scheduler.step()
        means = self.all_reduce_sum(totals / updates) / self.accelerator.num_processes
        stats = dict(zip(names, means.tolist()))
        stats["explained_variance"] = explained_variance(rollout.values, rollout.returns, rollout.mask)
        stats["ppo_epochs"] = epochs
        stats["learning_rate"] = self.optimizer.param_groups[0]["lr"]
        stats["time/optimisation_s"] = time.time() - started
        return stats

    # ------------------------------------------------------------------------- loop
    def train(self, checkpoint_dir: Path) -> list[dict[str, float]]:
        self.resume(checkpoint_dir)
        progress = tqdm(total=self.config.max_steps, initial=self.step, desc="ppo",
                        disable=not self.accelerator.is_main_process)
        while self.step < self.config.max_steps:
            rollout, stats = self.make_experience()
            stats.update(self.optimise(rollout))
            if self.config.adaptive_kl:  # 6. KL control
                self.kl_controller.update(stats["kl"], self.config.rollout_batch_size * self.accelerator.num_processes)
            self.step += 1
            stats["step"] = self.step
            if self.step % self.config.logging_steps == 0 or self.step == self.config.max_steps:
                self.log_history.append(stats)
                self.accelerator.log({k: v for k, v in stats.items() if k != "step"}, step=self.step)
                progress.set_postfix(reward=f"{stats['reward']:.3f}", kl=f"{stats['kl']:.3f}")
            for callback in self.callbacks:
                callback(self.step, stats)
            if self.step % self.config.save_steps == 0 and self.step < self.config.max_steps:
                self.save_checkpoint(checkpoint_dir)
            progress.update(1)
        progress.close()
        for tracker in self.accelerator.trackers:  # not end_training(): it destroys the process group later stages use
            tracker.finish()
        return self.log_history

    # ----------------------------------------------------------------- checkpoints
    def save_checkpoint(self, checkpoint_dir: Path) -> None:
        """accelerate state (weights, optimizer, scheduler, RNG) plus PPO's own: step, KL coefficient, log,
        and every rank's prompt sampler (each rank draws its own prompts)."""
        target = checkpoint_dir / f"checkpoint-{self.step}"
        self.accelerator.save_state(str(target))
        rank = self.accelerator.process_index
        (target / f"sampler_rank{rank}.json").write_text(json.dumps(self.generator.get_state().tolist()))
        self.accelerator.wait_for_everyone()  # every sampler is on disk before the checkpoint is marked complete
        if self.accelerator.is_main_process:
            state = {"step": self.step, "kl_coef": self.kl_controller.value, "log_history": self.log_history,
                     "world_size": self.accelerator.num_processes}
            (target / "ppo_state.json").write_text(json.dumps(state))
        self.accelerator.wait_for_everyone()

    def resume(self, checkpoint_dir: Path) -> None:
        done = [p for p in checkpoint_dir.glob("checkpoint-*") if (p / "ppo_state.json").is_file()]
        if not done:
            return
        latest = max(done, key=lambda p: int(p.name.rsplit("-", 1)[1]))
        state = json.loads((latest / "ppo_state.json").read_text())
        if state.get("world_size", 1) != self.accelerator.num_processes:
            raise ValueError(f"{latest} was written by {state.get('world_size', 1)} processes; this launch has "
                             f"{self.accelerator.num_processes}. PPO resumes only with the same number (each "
                             "process's prompt sampler is saved); relaunch with that many, or delete the checkpoints")
        self.accelerator.load_state(str(latest))
        self.step, self.kl_controller.value = state["step"], state["kl_coef"]
        self.log_history = state["log_history"]
        sampler = json.loads((latest / f"sampler_rank{self.accelerator.process_index}.json").read_text())
        self.generator.set_state(torch.tensor(sampler, dtype=torch.uint8))
        if self.accelerator.is_main_process:
            print(f"resuming from {latest}", flush=True)

    # ------------------------------------------------------------------- held-out evaluation
    @torch.no_grad()
    def evaluate(self, dataset) -> dict[str, float]:
        """Greedy responses to held-out prompts: mean score per reward term, accuracy, and KL to the reference.

        The KL is exact, not sampled: sum_t KL(pi(.|x, y<t) || pi_ref(.|x, y<t)) over the vocabulary at every
        position of the greedy response, averaged over prompts (a sampled log-ratio of a greedy response can be
        negative). Prompts are split between processes and the sums gathered.
        """

        accuracy = exact_match_reward(self.is_correct)
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        shard = dataset.select(range(rank, len(dataset), world))
        names = ["kl"] + [f"reward/{n}" for n in self.reward_names] + (["accuracy"] if "answer" in dataset.column_names else [])
        sums = torch.zeros(len(names), device=self.accelerator.device)
        for start in range(0, len(shard), self.config.rollout_batch_size):
            rows = shard.select(range(start, min(start + self.config.rollout_batch_size, len(shard))))
            columns = {name: list(rows[name]) for name in rows.column_names}
            batch = self.generate_responses(columns["prompt"], columns, do_sample=False)
            # the KL between the models' own distributions (temperature 1), not the sampling ones
            logits, _ = self.unwrapped(**batch.sequence_inputs())
            log_pi, log_ref = logits[:, :-1].float().log_softmax(-1), self.reference_logits(batch).log_softmax(-1)
            kl = (log_pi.exp() * (log_pi - log_ref)).sum(-1)
            values = [float((kl * batch.mask).sum())]
            values += [float(v.sum()) for v in self.term_scores(batch).values()]
            if "answer" in columns:
                values.append(sum(accuracy(batch.prompts, self.completions(batch), columns["answer"])))
            sums += torch.tensor(values, device=sums.device)
        sums = self.all_reduce_sum(sums)
        return {f"eval_{k}": float(v) / len(dataset) for k, v in zip(names, sums)}
