"""PPO's maths as pure tensor functions: masked statistics, reward normalisation, KL estimators, reward shaping,
the advantage estimators (GAE with a critic; RLOO, REINFORCE++ and GRPO from groups of samples), the clipped
losses and the adaptive KL controller. Per-token tensors are (batch, response length), with `mask` 1 on
response tokens; a group is `group_size` consecutive rows (samples of one prompt)."""

from __future__ import annotations

from typing import Callable

import torch

from pipeline.algorithms.ppo_trainer.config import STD_SCALED


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


class RunningMoments:
    """Mean and variance of every sequence score seen so far, for reward normalisation (checkpointed with the run).

    Batches are merged with Chan et al.'s parallel update, so the statistics equal those of all scores at once.
    """

    def __init__(self, count: float = 0.0, mean: float = 0.0, var: float = 1.0):
        self.count, self.mean, self.var = count, mean, var

    def update(self, total: float, total_squares: float, count: float) -> None:
        """Add a batch given by its sum, sum of squares and size (all-reduced over processes by the caller)."""
        batch_mean = total / count
        batch_var = max(total_squares / count - batch_mean ** 2, 0.0)
        merged = self.count + count
        delta = batch_mean - self.mean
        self.var = (self.var * self.count + batch_var * count + delta ** 2 * self.count * count / merged) / merged
        self.mean += delta * count / merged
        self.count = merged

    def normalize(self, scores: torch.Tensor, clip: float | None) -> torch.Tensor:
        out = (scores - self.mean) / (self.var ** 0.5 + 1e-8)
        return out if clip is None else out.clamp(-clip, clip)

    def state_dict(self) -> dict[str, float]:
        return {"count": self.count, "mean": self.mean, "var": self.var}


def leave_one_out(groups: torch.Tensor) -> torch.Tensor:
    """s_i - mean of the others' scores (RLOO, Ahmadian et al., 2024): (s_i - mean) * k / (k - 1)."""
    return (groups - groups.mean(1, keepdim=True)) * groups.shape[1] / (groups.shape[1] - 1)


def minus_group_mean(groups: torch.Tensor) -> torch.Tensor:
    """s_i - the group mean (REINFORCE++ with a baseline, Hu et al., 2025; whitened over the batch afterwards)."""
    return groups - groups.mean(1, keepdim=True)


def divided_by_std(centred: torch.Tensor, groups: torch.Tensor, scale: str,
                   all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] = identity) -> torch.Tensor:
    """GRPO's scaling of group-centred scores: by the group's std ("group", Shao et al., 2024, as TRL's default), by
    the std of every score in the batch, all processes' ("batch", Liu et al., 2025's "Lite PPO"), or not ("none",
    Dr. GRPO). Unbiased stds and +1e-4, as TRL's GRPOTrainer."""
    if scale == "group":
        return centred / (groups.std(1, keepdim=True) + 1e-4)
    if scale == "batch":
        sums = all_reduce_sum(torch.stack([groups.sum(), (groups * groups).sum(), torch.tensor(float(groups.numel()))]))
        count = sums[2]
        var = ((sums[1] - sums[0] ** 2 / count) / (count - 1).clamp(min=1)).clamp(min=0)
        return centred / (var.sqrt() + 1e-4)
    return centred


GROUP_BASELINES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "rloo": leave_one_out, "reinforce_plus_plus": minus_group_mean, "grpo": minus_group_mean}


def group_baselined_scores(scores: torch.Tensor, group_size: int, estimator: str, scale_rewards: str = "group",
                           all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] = identity) -> torch.Tensor:
    """Each sample's score against its group's (the other samples of the same prompt): `GROUP_BASELINES[estimator]`,
    then for GRPO divided by a std (`divided_by_std`)."""
    groups = scores.view(-1, group_size)
    baselined = GROUP_BASELINES[estimator](groups)
    if estimator in STD_SCALED:
        baselined = divided_by_std(baselined, groups, scale_rewards, all_reduce_sum)
    return baselined.reshape(-1)


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


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
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


def returns_to_go(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """G_t = sum_{t' >= t} gamma^(t'-t) r_t' over response tokens: the advantage of the critic-free estimators."""
    returns = torch.zeros_like(rewards)
    running = torch.zeros(rewards.shape[0], device=rewards.device)
    for t in reversed(range(rewards.shape[1])):
        running = (rewards[:, t] + gamma * running) * mask[:, t]
        returns[:, t] = running
    return returns


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip_range: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clipped surrogate; returns (loss, clip fraction, approximate KL old->new)."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    clip_fraction = masked_mean((clipped > unclipped).float(), mask)
    approx_kl = masked_mean(0.5 * log_ratio ** 2, mask)
    return loss, clip_fraction, approx_kl


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip_range_value: float) -> tuple[torch.Tensor, torch.Tensor]:
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
