"""PPO maths for RLHF as free functions on ``(batch, time)`` tensors of response tokens.

Conventions (the same as TRL / OpenRLHF):

- Every per-token tensor is aligned with the *response* tokens: position ``t`` holds the quantity
  for the t-th generated token. ``mask`` is 1 for real tokens and 0 for right padding; a row's
  valid tokens are a prefix (right padding only), which GAE relies on.
- The sequence-level score (reward model or user feedback) is added at the row's last valid
  token; every token also pays ``-kl_coef * (logp - ref_logp)`` (the k1 KL estimator).
- Losses are *sums over valid tokens divided by a normaliser*. By default the normaliser is the
  local token count (a masked mean). Under data parallelism the caller passes the global token
  count instead, so that averaging gradients across ranks equals the single-process gradient of
  the whole batch. Likewise ``whiten`` accepts precomputed (global) mean and variance.

No function here touches a model, an optimiser or a collective.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class PPOConfig:
    """Hyper-parameters of one PPO update; defaults follow common RLHF practice."""

    gamma: float = 1.0
    """Discount per token. RLHF rewards arrive at the end, so 1.0 is usual."""
    lam: float = 0.95
    """GAE lambda: 1.0 is Monte-Carlo returns, 0.0 is one-step TD."""
    kl_coef: float = 0.05
    """Weight of the per-token KL penalty to the reference model."""
    clip_range: float = 0.2
    """Policy ratio clip epsilon."""
    clip_range_value: float = 0.2
    """Value clip around the old value estimates."""
    value_loss_coef: float = 0.5
    """Weight of the critic loss when actor and critic share one optimiser step (reported only)."""
    whiten_advantages: bool = True
    """Normalise advantages to zero mean / unit variance over the batch's valid tokens."""
    score_clip: float | None = None
    """Clip sequence scores to [-score_clip, score_clip] before use (None: no clipping)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"gamma must be in [0, 1], got {self.gamma}")
        if not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"lam must be in [0, 1], got {self.lam}")
        if self.kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {self.kl_coef}")
        if self.clip_range <= 0 or self.clip_range_value <= 0:
            raise ValueError(
                f"clip ranges must be > 0, got clip_range={self.clip_range}, "
                f"clip_range_value={self.clip_range_value}"
            )
        if self.score_clip is not None and self.score_clip <= 0:
            raise ValueError(f"score_clip must be > 0 or None, got {self.score_clip}")


def _check_same_shape(**tensors: Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"tensors must have the same shape, got {shapes}")


def masked_sum(values: Tensor, mask: Tensor) -> Tensor:
    """Sum of ``values`` where ``mask`` is 1."""
    _check_same_shape(values=values, mask=mask)
    return (values * mask).sum()


def masked_mean(values: Tensor, mask: Tensor, normalizer: float | Tensor | None = None) -> Tensor:
    """Sum of masked values divided by ``normalizer`` (default: the number of valid tokens)."""
    total = masked_sum(values, mask)
    denom = mask.sum() if normalizer is None else normalizer
    if float(denom) <= 0:
        raise ValueError(f"masked_mean needs a positive normaliser, got {float(denom)}")
    return total / denom


def masked_var(values: Tensor, mask: Tensor, mean: Tensor | None = None, unbiased: bool = True) -> Tensor:
    """Variance over valid tokens (Bessel-corrected by default, as TRL's ``masked_var``)."""
    mu = masked_mean(values, mask) if mean is None else mean
    count = mask.sum()
    var = masked_sum((values - mu) ** 2, mask) / count
    if unbiased:
        if float(count) < 2:
            raise ValueError(f"unbiased variance needs >= 2 valid tokens, got {float(count)}")
        var = var * count / (count - 1)
    return var


def whiten(
    values: Tensor,
    mask: Tensor,
    *,
    shift_mean: bool = True,
    mean: Tensor | None = None,
    var: Tensor | None = None,
    eps: float = 1e-8,
) -> Tensor:
    """``(values - mean) / sqrt(var + eps)`` over valid tokens; padding positions become 0.

    ``mean``/``var`` default to this batch's statistics; a data-parallel caller passes global
    ones. With ``shift_mean=False`` the mean is added back (only the scale is normalised).
    """
    mu = masked_mean(values, mask) if mean is None else mean
    sigma2 = masked_var(values, mask, mean=mu) if var is None else var
    out = (values - mu) * torch.rsqrt(sigma2 + eps)
    if not shift_mean:
        out = out + mu
    return out * mask


def last_token_index(mask: Tensor) -> Tensor:
    """Index of each row's last valid token; rows must have at least one (prefix masks)."""
    lengths = mask.long().sum(dim=-1)
    if bool((lengths == 0).any()):
        raise ValueError("every response needs at least one valid token")
    return lengths - 1


def kl_penalized_rewards(
    scores: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    kl_coef: float,
    *,
    score_clip: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-token rewards ``-kl_coef * (logp - ref_logp)`` plus the score on the last valid token.

    Returns ``(rewards, kl)`` where ``kl`` is the per-token k1 estimate (masked). ``scores`` has
    shape ``(batch,)``.
    """
    _check_same_shape(logprobs=logprobs, ref_logprobs=ref_logprobs, mask=mask)
    if scores.shape != logprobs.shape[:1]:
        raise ValueError(f"scores shape {tuple(scores.shape)} != batch {tuple(logprobs.shape[:1])}")
    if score_clip is not None:
        scores = scores.clamp(-score_clip, score_clip)
    kl = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * kl
    last = last_token_index(mask)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards = rewards.index_put((rows, last), rewards[rows, last] + scores.to(rewards.dtype))
    return rewards * mask, kl


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation; returns ``(advantages, returns)``.

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` with ``V`` taken as 0 past the last valid token,
    ``A_t = delta_t + gamma * lam * A_{t+1}``, ``returns = A + V``. Both are 0 on padding.
    """
    _check_same_shape(rewards=rewards, values=values, mask=mask)
    rewards = rewards * mask
    values = values * mask
    steps = rewards.shape[-1]
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[..., 0])
    for t in reversed(range(steps)):
        next_value = values[..., t + 1] if t + 1 < steps else torch.zeros_like(running)
        delta = rewards[..., t] + gamma * next_value - values[..., t]
        running = (delta + gamma * lam * running) * mask[..., t]
        advantages[..., t] = running
    returns = (advantages + values) * mask
    return advantages, returns


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_range: float,
    *,
    normalizer: float | Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate ``max(-A * r, -A * clip(r, 1-e, 1+e))`` averaged over valid tokens.

    Returns the loss and detached diagnostics: ``clipfrac`` (share of tokens where the clipped
    branch is active) and ``approx_kl`` (mean of ``0.5 * (logp - old_logp)^2``).
    """
    _check_same_shape(logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages, mask=mask)
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask, normalizer)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).to(logprobs.dtype), mask)
        approx_kl = masked_mean(0.5 * log_ratio**2, mask)
    return loss, {"clipfrac": clipfrac, "approx_kl": approx_kl}


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip_range_value: float,
    *,
    normalizer: float | Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss ``0.5 * max((V - R)^2, (V_clip - R)^2)`` over valid tokens.

    ``V_clip = old_V + clamp(V - old_V, -c, c)`` keeps the critic inside a trust region around
    the values it predicted when the batch was made.
    """
    _check_same_shape(values=values, old_values=old_values, returns=returns, mask=mask)
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    loss_unclipped = (values - returns) ** 2
    loss_clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(loss_unclipped, loss_clipped), mask, normalizer)
    with torch.no_grad():
        clipfrac = masked_mean((loss_clipped > loss_unclipped).to(values.dtype), mask)
    return loss, {"vf_clipfrac": clipfrac}


def token_logprobs(logits: Tensor, tokens: Tensor) -> Tensor:
    """Log-probability of ``tokens`` under ``logits`` (``logits[..., t, :]`` predicts ``tokens[..., t]``)."""
    if logits.shape[:-1] != tokens.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match tokens {tuple(tokens.shape)}")
    logp = torch.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
