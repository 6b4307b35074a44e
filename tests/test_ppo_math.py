"""PPO's pieces against values computed by hand on small tensors."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.algorithms.dynamic_sampling import zero_variance_groups
from pipeline.algorithms.ppo_trainer.config import PPOConfig
from pipeline.algorithms.ppo_trainer.maths import (
    AdaptiveKLController,
    RunningMoments,
    explained_variance,
    gae,
    group_baselined_scores,
    kl_per_token,
    masked_whiten,
    policy_loss,
    returns_to_go,
    shaped_rewards,
    value_loss,
)

T = torch.tensor


def test_gae_by_hand():
    # One sequence of 3 response tokens then padding; gamma 0.9, lambda 0.8.
    rewards = T([[0.0, 0.5, 1.0, 0.0]])
    values = T([[0.2, 0.4, 0.6, 0.0]])
    mask = T([[1.0, 1.0, 1.0, 0.0]])
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    d2 = 1.0 + 0.9 * 0.0 - 0.6                # last token: nothing after the end
    d1 = 0.5 + 0.9 * 0.6 - 0.4
    d0 = 0.0 + 0.9 * 0.4 - 0.2
    a2 = d2
    a1 = d1 + 0.9 * 0.8 * a2
    a0 = d0 + 0.9 * 0.8 * a1
    assert torch.allclose(advantages, T([[a0, a1, a2, 0.0]]))
    assert torch.allclose(returns, T([[a0 + 0.2, a1 + 0.4, a2 + 0.6, 0.0]]))


def test_gae_gamma_one_lambda_one_is_reward_to_go_minus_value():
    rewards = T([[1.0, 2.0, 3.0]])
    values = T([[0.5, 0.5, 0.5]])
    advantages, _ = gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=1.0)
    assert torch.allclose(advantages, T([[6.0 - 0.5, 5.0 - 0.5, 3.0 - 0.5]]))


def test_masked_whiten_by_hand():
    x = T([[1.0, 2.0, 3.0, 100.0]])
    mask = T([[1.0, 1.0, 1.0, 0.0]])
    out = masked_whiten(x, mask)
    # mean 2, unbiased variance ((1)+(0)+(1))/2 = 1
    assert torch.allclose(out, T([[-1.0, 0.0, 1.0, 0.0]]), atol=1e-6)


def test_clipped_policy_loss_by_hand():
    old = torch.log(T([[0.5, 0.5]]))
    new = torch.log(T([[0.75, 0.25]]))            # ratios 1.5 and 0.5
    advantages = T([[1.0, -1.0]])
    loss, clip_fraction, approx_kl = policy_loss(new, old, advantages, torch.ones(1, 2), clip_range=0.2)
    # token 0: max(-1*1.5, -1*1.2) = -1.2 (clipped); token 1: max(1*0.5, 1*0.8) = 0.8 (clipped)
    assert loss.item() == pytest.approx((-1.2 + 0.8) / 2)
    assert clip_fraction.item() == pytest.approx(1.0)
    assert approx_kl.item() == pytest.approx(0.5 * (math.log(1.5) ** 2 + math.log(0.5) ** 2) / 2)


def test_unclipped_when_ratio_inside_range():
    old = torch.log(T([[0.5]]))
    new = torch.log(T([[0.55]]))                  # ratio 1.1 inside [0.8, 1.2]
    loss, clip_fraction, _ = policy_loss(new, old, T([[2.0]]), torch.ones(1, 1), clip_range=0.2)
    assert loss.item() == pytest.approx(-2.0 * 1.1) and clip_fraction.item() == 0.0


def test_clipped_value_loss_by_hand():
    values, old, returns = T([[1.0, 0.0]]), T([[0.0, 0.0]]), T([[2.0, 0.1]])
    loss, clip_fraction = value_loss(values, old, returns, torch.ones(1, 2), clip_range_value=0.5)
    # token 0: clipped value 0.5 -> max((1-2)^2, (0.5-2)^2) = 2.25; token 1: (0-0.1)^2 both = 0.01
    assert loss.item() == pytest.approx(0.5 * (2.25 + 0.01) / 2)
    assert clip_fraction.item() == pytest.approx(0.5)


def test_kl_estimators_by_hand():
    logp, ref = torch.log(T([0.5, 0.2])), torch.log(T([0.25, 0.4]))
    k1 = kl_per_token(logp, ref, "k1")
    k3 = kl_per_token(logp, ref, "k3")
    assert torch.allclose(k1, T([math.log(2.0), math.log(0.5)]))
    rho = T([0.5, 2.0])                            # pi_ref / pi
    assert torch.allclose(k3, (rho - 1) - torch.log(rho))
    assert (k3 >= 0).all()


def test_kl_estimators_agree_in_expectation():
    """Both are unbiased estimates of KL(pi || ref) when tokens are drawn from pi."""
    torch.manual_seed(0)
    pi, ref = torch.tensor([0.6, 0.3, 0.1]), torch.tensor([0.3, 0.3, 0.4])
    exact = (pi * (pi / ref).log()).sum()
    samples = torch.multinomial(pi, 200_000, replacement=True)
    logp, logr = pi.log()[samples], ref.log()[samples]
    assert kl_per_token(logp, logr, "k1").mean().item() == pytest.approx(exact.item(), abs=0.01)
    assert kl_per_token(logp, logr, "k3").mean().item() == pytest.approx(exact.item(), abs=0.01)


def test_shaped_rewards_put_score_on_last_token():
    kl = T([[0.1, 0.2, 0.3], [0.5, 0.0, 0.0]])
    mask = T([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    rewards = shaped_rewards(T([2.0, -1.0]), kl, mask, kl_coef=0.5)
    assert torch.allclose(rewards, T([[-0.05, -0.1, -0.15 + 2.0], [-0.25 - 1.0, 0.0, 0.0]]))


def test_explained_variance():
    returns = T([[1.0, 2.0, 3.0]])
    assert explained_variance(returns, returns, torch.ones(1, 3)) == pytest.approx(1.0)
    assert explained_variance(torch.full((1, 3), 2.0), returns, torch.ones(1, 3)) == pytest.approx(0.0)


def test_adaptive_kl_controller():
    controller = AdaptiveKLController(0.1, target=1.0, horizon=100)
    controller.update(current_kl=2.0, n_steps=10)   # error clipped to +0.2
    assert controller.value == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))
    controller.update(current_kl=0.9, n_steps=10)   # error -0.1
    assert controller.value == pytest.approx(0.1 * 1.02 * (1 - 0.1 * 0.1))


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="kl_estimator"):
        PPOConfig(kl_estimator="k2")
    with pytest.raises(ValueError, match="multiple of"):
        PPOConfig(rollout_batch_size=10, mini_batch_size=4)
    with pytest.raises(ValueError, match="samples_per_prompt >= 2"):
        PPOConfig(advantage_estimator="grpo", samples_per_prompt=1)
    with pytest.raises(ValueError, match="multiple of samples_per_prompt"):
        PPOConfig(advantage_estimator="rloo", samples_per_prompt=3)
    with pytest.raises(ValueError, match="dynamic_sampling_max_draws must be >= 1"):
        PPOConfig(advantage_estimator="rloo", samples_per_prompt=4, dynamic_sampling_max_draws=0)
    with pytest.raises(ValueError, match="group baseline"):
        PPOConfig(dynamic_sampling_max_draws=2)
    with pytest.raises(ValueError, match="scale_rewards must be one of"):
        PPOConfig(advantage_estimator="grpo", scale_rewards="rank")
    with pytest.raises(ValueError, match="advantage_estimator must be one of"):
        PPOConfig(advantage_estimator="vtrace")
    assert PPOConfig(learning_rate=2e-5).learning_rates(adapters=True) == pytest.approx((2e-5, 2e-4))
    assert PPOConfig().learning_rates(adapters=True) == pytest.approx((1e-4, 1e-3))
    assert PPOConfig().learning_rates(adapters=False) == pytest.approx((1e-5, 1e-4))
    assert PPOConfig(critic_learning_rate=3e-3).learning_rates(adapters=False) == pytest.approx((1e-5, 3e-3))
    assert PPOConfig().samples_per_prompt == 1 and PPOConfig(advantage_estimator="rloo").samples_per_prompt == 4


# Two prompts, four samples each: scores by hand.
GROUPS = T([1.0, 0.0, 0.0, 3.0, 2.0, 2.0, 2.0, 2.0])


def test_rloo_baseline_is_the_mean_of_the_other_samples():
    expected = [1 - (0 + 0 + 3) / 3, 0 - (1 + 0 + 3) / 3, 0 - (1 + 0 + 3) / 3, 3 - (1 + 0 + 0) / 3, 0, 0, 0, 0]
    assert torch.allclose(group_baselined_scores(GROUPS, 4, "rloo"), T(expected))


def test_reinforce_plus_plus_baseline_is_the_group_mean():
    assert torch.allclose(group_baselined_scores(GROUPS, 4, "reinforce_plus_plus"),
                          T([0.0, -1.0, -1.0, 2.0, 0, 0, 0, 0]))


def test_grpo_divides_by_the_group_std():
    std = math.sqrt((0 + 1 + 1 + 4) / 3)  # unbiased, around the mean 1
    expected = T([0.0, -1.0, -1.0, 2.0]) / (std + 1e-4)
    assert torch.allclose(group_baselined_scores(GROUPS, 4, "grpo", "group"), torch.cat([expected, torch.zeros(4)]))


def test_grpo_divides_by_the_batch_std_or_not_at_all():
    mean = 12 / 8  # all eight scores
    std = math.sqrt(sum((x - mean) ** 2 for x in [1, 0, 0, 3, 2, 2, 2, 2]) / 7)
    centred = T([0.0, -1.0, -1.0, 2.0, 0, 0, 0, 0])
    assert torch.allclose(group_baselined_scores(GROUPS, 4, "grpo", "batch"), centred / (std + 1e-4))
    assert torch.allclose(group_baselined_scores(GROUPS, 4, "grpo", "none"), centred)
    assert PPOConfig(advantage_estimator="grpo").scale_rewards == "batch"


def test_grpo_batch_std_is_over_every_process():
    """Under DDP each rank holds part of the batch: summing the statistics gives the whole batch's std."""
    halves = GROUPS.view(2, 4)
    sums = [torch.stack([h.sum(), (h * h).sum(), torch.tensor(4.0)]) for h in halves]
    whole = group_baselined_scores(GROUPS, 4, "grpo", "batch")
    for rank, half in enumerate(halves):
        on_rank = group_baselined_scores(half, 4, "grpo", "batch", all_reduce_sum=lambda x: sums[0] + sums[1])
        assert torch.allclose(on_rank, whole[4 * rank:4 * rank + 4])


def test_zero_variance_groups():
    assert zero_variance_groups(GROUPS, 4).tolist() == [False, True]
    assert zero_variance_groups(GROUPS, 2).tolist() == [False, False, True, True]


def test_returns_to_go_by_hand():
    rewards = T([[0.1, -0.2, 1.0, 0.0], [0.5, 0.0, 0.0, 0.0]])
    mask = T([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    expected = T([[0.1 + 0.9 * (-0.2 + 0.9 * 1.0), -0.2 + 0.9 * 1.0, 1.0, 0.0], [0.5, 0.0, 0.0, 0.0]])
    assert torch.allclose(returns_to_go(rewards, mask, gamma=0.9), expected)


def test_running_moments_equal_the_statistics_of_all_scores():
    torch.manual_seed(0)
    batches = [torch.randn(n) * 3 + 1 for n in (5, 17, 8)]
    moments = RunningMoments()
    for b in batches:
        moments.update(float(b.sum()), float((b * b).sum()), len(b))
    every = torch.cat(batches)
    assert moments.count == 30
    assert moments.mean == pytest.approx(float(every.mean()), abs=1e-5)
    assert moments.var == pytest.approx(float(every.var(unbiased=False)), abs=1e-4)
    normalized = moments.normalize(T([moments.mean + 2 * moments.var ** 0.5, 1e6]), clip=5.0)
    assert torch.allclose(normalized, T([2.0, 5.0]), atol=1e-4)
