"""PPO maths against values computed by hand (the arithmetic is spelled out in comments)."""

from __future__ import annotations

import math

import pytest
import torch

from core.rlhf.ppo import (
    PPOConfig,
    gae,
    kl_penalized_rewards,
    masked_mean,
    masked_var,
    policy_loss,
    token_logprobs,
    value_loss,
    whiten,
)


def t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def test_gae_matches_hand_computation() -> None:
    # gamma=1, lam=0.5, reward only at the end.
    # t=2: delta = 1 + 0 - 0.3 = 0.7            A2 = 0.7
    # t=1: delta = 0 + 0.3 - 0.4 = -0.1         A1 = -0.1 + 0.5 * 0.7 = 0.25
    # t=0: delta = 0 + 0.4 - 0.5 = -0.1         A0 = -0.1 + 0.5 * 0.25 = 0.025
    adv, ret = gae(t([[0, 0, 1]]), t([[0.5, 0.4, 0.3]]), t([[1, 1, 1]]), gamma=1.0, lam=0.5)
    assert adv.tolist()[0] == pytest.approx([0.025, 0.25, 0.7])
    assert ret.tolist()[0] == pytest.approx([0.525, 0.65, 1.0])


def test_gae_ignores_padding_and_bootstraps_zero_after_last_token() -> None:
    # gamma=0.9, lam=1; the padded value 9 must not leak into t=1.
    # t=1: delta = 2 + 0.9 * 0 - 1 = 1          A1 = 1
    # t=0: delta = 0 + 0.9 * 1 - 1 = -0.1       A0 = -0.1 + 0.9 * 1 = 0.8
    adv, ret = gae(t([[0, 2, 5]]), t([[1, 1, 9]]), t([[1, 1, 0]]), gamma=0.9, lam=1.0)
    assert adv.tolist()[0] == pytest.approx([0.8, 1.0, 0.0])
    assert ret.tolist()[0] == pytest.approx([1.8, 2.0, 0.0])


def test_gae_equals_discounted_return_minus_value_when_lambda_is_one() -> None:
    gen = torch.Generator().manual_seed(0)
    rewards = torch.randn(3, 6, generator=gen, dtype=torch.float64)
    values = torch.randn(3, 6, generator=gen, dtype=torch.float64)
    mask = torch.ones(3, 6, dtype=torch.float64)
    gamma = 0.8
    adv, _ = gae(rewards, values, mask, gamma=gamma, lam=1.0)
    for row in range(3):
        for step in range(6):
            mc = sum(gamma ** (k - step) * float(rewards[row, k]) for k in range(step, 6))
            assert float(adv[row, step]) == pytest.approx(mc - float(values[row, step]))


def test_kl_penalized_rewards_put_score_on_last_valid_token() -> None:
    # kl = logp - ref = [0.5, -1.0, (pad)]; rewards = -0.1 * kl, + score 1.0 on the last valid token.
    rewards, kl = kl_penalized_rewards(
        scores=t([[1.0]])[0],
        logprobs=t([[-1.0, -2.0, -3.0]]),
        ref_logprobs=t([[-1.5, -1.0, -0.5]]),
        mask=t([[1, 1, 0]]),
        kl_coef=0.1,
    )
    assert rewards.tolist()[0] == pytest.approx([-0.05, 1.1, 0.0])
    assert kl.tolist()[0] == pytest.approx([0.5, -1.0, 0.0])


def test_kl_penalized_rewards_clip_scores() -> None:
    zeros = torch.zeros(2, 1)
    rewards, _ = kl_penalized_rewards(
        torch.tensor([10.0, -10.0]), zeros, zeros, torch.ones(2, 1), 0.0, score_clip=2.0
    )
    assert rewards.flatten().tolist() == [2.0, -2.0]


def test_policy_loss_matches_hand_computation() -> None:
    # ratios 1.5, 0.5, 1.1 with advantages 1, 1, -1 and eps 0.2:
    #   token0: max(-1.5, -1.2) = -1.2 (clipped branch)
    #   token1: max(-0.5, -0.8) = -0.5
    #   token2: max(1.1, 1.1) = 1.1
    # mean = (-1.2 - 0.5 + 1.1) / 3 = -0.2
    logp = t([[math.log(1.5), math.log(0.5), math.log(1.1)]])
    loss, stats = policy_loss(logp, torch.zeros_like(logp), t([[1, 1, -1]]), torch.ones_like(logp), 0.2)
    assert float(loss) == pytest.approx(-0.2)
    assert float(stats["clipfrac"]) == pytest.approx(1 / 3)


def test_policy_loss_gradient_is_zero_where_clipped() -> None:
    logp = t([[math.log(1.5), math.log(0.9)]]).requires_grad_(True)
    loss, _ = policy_loss(logp, torch.zeros(1, 2, dtype=torch.float64), t([[1, 1]]), t([[1, 1]]), 0.2)
    loss.backward()
    assert logp.grad is not None
    # token0 is clipped (ratio 1.5 > 1.2, A > 0): no gradient. token1: d(-A r)/dlogp / 2 = -0.9 / 2.
    assert logp.grad.tolist()[0] == pytest.approx([0.0, -0.45])


def test_importance_corrected_policy_loss_matches_hand_computation() -> None:
    """Off-policy PPO: the "old" log-probs are the behaviour log-probs carried by the rollouts.

    Row 0 was served by an older version (behaviour log-probs log 0.2, log 0.5); the current
    policy gives log 0.3, log 0.25, so the importance ratios are 1.5 and 0.5. Row 1 is
    on-policy for its first token (ratio 1.0), its second token is right padding. Advantages
    [2, -1] and [0.5, pad]; eps 0.2; the loss is divided by a global token count of 4 (a
    data-parallel peer holds one more token):
      r=1.5, A=2:    max(-3.0, -2.4) = -2.4   (clipped: the stale sample cannot pull further)
      r=0.5, A=-1:   max(0.5, 0.8)   =  0.8   (clipped from below)
      r=1.0, A=0.5:  max(-0.5, -0.5) = -0.5
      loss = (-2.4 + 0.8 - 0.5) / 4 = -0.525; clipfrac 2/3 of the local tokens;
      approx_kl = mean 0.5 * log(r)^2 = 0.5 * (log(1.5)^2 + log(0.5)^2 + 0) / 3.
    """
    behaviour = t([[math.log(0.2), math.log(0.5)], [math.log(0.4), 0.0]])
    current = t([[math.log(0.3), math.log(0.25)], [math.log(0.4), 0.0]]).requires_grad_(True)
    mask = t([[1, 1], [1, 0]])
    loss, stats = policy_loss(current, behaviour, t([[2, -1], [0.5, 0]]), mask, 0.2, normalizer=4.0)
    assert float(loss) == pytest.approx(-0.525)
    assert float(stats["clipfrac"]) == pytest.approx(2 / 3)
    assert float(stats["approx_kl"]) == pytest.approx(0.5 * (math.log(1.5) ** 2 + math.log(0.5) ** 2) / 3)
    loss.backward()
    assert current.grad is not None
    # Clipped tokens carry no gradient; the on-policy token: d(-A r)/dlogp = -A r / 4 = -0.125.
    assert current.grad.flatten().tolist() == pytest.approx([0.0, 0.0, -0.125, 0.0])


def test_value_loss_matches_hand_computation() -> None:
    # token0: (2.0-1.5)^2 = 0.25 vs clip 1.0+0.2=1.2 -> (1.2-1.5)^2 = 0.09 -> 0.25
    # token1: (0.5-1.0)^2 = 0.25 vs clip 0.0+0.2=0.2 -> (0.2-1.0)^2 = 0.64 -> 0.64
    # loss = 0.5 * (0.25 + 0.64) / 2 = 0.2225
    loss, stats = value_loss(t([[2.0, 0.5]]), t([[1.0, 0.0]]), t([[1.5, 1.0]]), t([[1, 1]]), 0.2)
    assert float(loss) == pytest.approx(0.2225)
    assert float(stats["vf_clipfrac"]) == pytest.approx(0.5)


def test_whiten_matches_hand_computation_and_zeroes_padding() -> None:
    # mean 2.5, unbiased var (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5/3
    out = whiten(t([[1, 2, 3, 4, 100]]), t([[1, 1, 1, 1, 0]]))
    scale = math.sqrt(5 / 3)
    assert out.tolist()[0] == pytest.approx([-1.5 / scale, -0.5 / scale, 0.5 / scale, 1.5 / scale, 0.0])
    kept = whiten(t([[1, 2, 3, 4]]), t([[1, 1, 1, 1]]), shift_mean=False)
    expected = [2.5 + d / scale for d in (-1.5, -0.5, 0.5, 1.5)]
    assert kept.tolist()[0] == pytest.approx(expected)


def test_masked_statistics_with_external_normaliser() -> None:
    values, mask = t([[1, 3, 7]]), t([[1, 1, 0]])
    assert float(masked_mean(values, mask)) == 2.0
    assert float(masked_mean(values, mask, normalizer=4.0)) == 1.0
    assert float(masked_var(values, mask)) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="positive"):
        masked_mean(values, torch.zeros_like(mask))


def test_token_logprobs_matches_log_softmax() -> None:
    logits = torch.tensor([[[0.0, math.log(3.0)], [math.log(2.0), 0.0]]], dtype=torch.float64)
    lp = token_logprobs(logits, torch.tensor([[1, 1]]))
    assert lp.tolist()[0] == pytest.approx([math.log(0.75), math.log(1 / 3)])


def test_config_validation_names_the_value() -> None:
    with pytest.raises(ValueError, match="lam"):
        PPOConfig(lam=1.5)
    with pytest.raises(ValueError, match="clip"):
        PPOConfig(clip_range=0.0)


def test_shape_mismatch_is_rejected() -> None:
    with pytest.raises(ValueError, match="same shape"):
        gae(t([[0, 1]]), t([[0, 1, 2]]), t([[1, 1]]), 1.0, 1.0)
