"""Rollouts -> padded PPO batches -> scored experience (log-probs, values, advantages).

Layout: each row is ``prompt + response`` right-padded to the batch's longest row. Response
token ``t`` of row ``i`` sits at position ``prompt_len[i] + t`` and is predicted by the logits at
``prompt_len[i] + t - 1``; ``response_positions`` holds those logit positions, ``response_mask``
marks real response tokens. Every per-token tensor of the PPO maths is ``(batch, max_response)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from core.rlhf.buffer import Rollout
from core.rlhf.ppo import PPOConfig, gae, kl_penalized_rewards, token_logprobs, whiten
from workers.trainer.models import PolicyModels, ValueModel, causal_lm_logits

__all__ = ["Experience", "PPOBatch", "Rollout", "collate", "make_experience"]


@dataclass
class PPOBatch:
    input_ids: Tensor
    """(B, L) right-padded prompt+response ids."""
    lengths: Tensor
    """(B,) valid length of each row."""
    response_positions: Tensor
    """(B, R) logit position predicting each response token (clamped on padding)."""
    response_tokens: Tensor
    """(B, R) response ids (pad on padding)."""
    response_mask: Tensor
    """(B, R) float, 1 on real response tokens."""
    behaviour_logprobs: Tensor
    """(B, R) log-probs reported with the rollouts."""
    request_ids: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def select(self, rows: Sequence[int]) -> PPOBatch:
        """Sub-batch of ``rows``, trimmed to its own longest row and response."""
        idx = torch.as_tensor(list(rows), dtype=torch.long)
        lengths = self.lengths[idx]
        resp_len = int(self.response_mask[idx].sum(dim=1).max())
        return PPOBatch(
            input_ids=self.input_ids[idx, : int(lengths.max())],
            lengths=lengths,
            response_positions=self.response_positions[idx, :resp_len],
            response_tokens=self.response_tokens[idx, :resp_len],
            response_mask=self.response_mask[idx, :resp_len],
            behaviour_logprobs=self.behaviour_logprobs[idx, :resp_len],
            request_ids=tuple(self.request_ids[i] for i in rows),
        )


def collate(rollouts: Sequence[Rollout], pad_token_id: int) -> PPOBatch:
    """Right-pad rollouts into one batch (see the module docstring for the layout)."""
    if not rollouts:
        raise ValueError("cannot collate an empty list of rollouts")
    n = len(rollouts)
    max_len = max(len(r.prompt_token_ids) + len(r.response_token_ids) for r in rollouts)
    max_resp = max(len(r.response_token_ids) for r in rollouts)
    input_ids = torch.full((n, max_len), pad_token_id, dtype=torch.long)
    positions = torch.zeros((n, max_resp), dtype=torch.long)
    tokens = torch.full((n, max_resp), pad_token_id, dtype=torch.long)
    mask = torch.zeros((n, max_resp))
    behaviour = torch.zeros((n, max_resp))
    lengths = torch.zeros(n, dtype=torch.long)
    for i, r in enumerate(rollouts):
        p, k = len(r.prompt_token_ids), len(r.response_token_ids)
        input_ids[i, :p] = torch.tensor(r.prompt_token_ids)
        input_ids[i, p : p + k] = torch.tensor(r.response_token_ids)
        lengths[i] = p + k
        positions[i, :k] = torch.arange(p - 1, p + k - 1)
        positions[i, k:] = p + k - 2
        tokens[i, :k] = torch.tensor(r.response_token_ids)
        mask[i, :k] = 1.0
        behaviour[i, :k] = torch.tensor(r.response_logprobs)
    return PPOBatch(input_ids, lengths, positions, tokens, mask, behaviour, tuple(r.request_id for r in rollouts))


def gather_positions(per_position: Tensor, positions: Tensor) -> Tensor:
    """``per_position[i, positions[i, t], ...]`` for (B, L, ...) inputs."""
    if per_position.dim() == 2:
        return per_position.gather(1, positions)
    index = positions.unsqueeze(-1).expand(-1, -1, per_position.shape[-1])
    return per_position.gather(1, index)


def response_logprobs(model: torch.nn.Module, batch: PPOBatch) -> Tensor:
    """(B, R) log-probs of the response tokens under ``model`` (grad flows if enabled)."""
    logits = causal_lm_logits(model, batch.input_ids)
    return token_logprobs(gather_positions(logits, batch.response_positions), batch.response_tokens)


def response_values(critic: ValueModel, batch: PPOBatch) -> Tensor:
    """(B, R) critic values for the state *before* each response token."""
    return gather_positions(critic(batch.input_ids), batch.response_positions)


@dataclass
class Experience:
    """A batch with everything the PPO update needs, computed once with frozen weights."""

    batch: PPOBatch
    old_logprobs: Tensor
    ref_logprobs: Tensor
    old_values: Tensor
    scores: Tensor
    advantages: Tensor
    returns: Tensor
    stats: dict[str, float] = field(default_factory=dict)

    def select(self, rows: Sequence[int]) -> Experience:
        sub = self.batch.select(rows)
        idx = torch.as_tensor(list(rows), dtype=torch.long)
        width = sub.response_mask.shape[1]

        def cut(t: Tensor) -> Tensor:
            return t[idx, :width]

        return Experience(
            batch=sub,
            old_logprobs=cut(self.old_logprobs),
            ref_logprobs=cut(self.ref_logprobs),
            old_values=cut(self.old_values),
            scores=self.scores[idx],
            advantages=cut(self.advantages),
            returns=cut(self.returns),
        )


@torch.no_grad()
def make_experience(
    models: PolicyModels,
    batch: PPOBatch,
    scores: Tensor,
    cfg: PPOConfig,
    ref_logprobs: Tensor | None = None,
) -> Experience:
    """Reference log-probs, values, KL-penalised rewards, GAE advantages and returns.

    The "old" log-probs of the PPO ratio are the rollouts' *behaviour* log-probs (what the
    serving policy version reported), not the current actor's: for a stale or adapter-served
    rollout the clipped ratio ``pi_theta / pi_behaviour`` is then its importance weight. The KL
    penalty is estimated from the same behaviour log-probs (k1 estimator on the sampled tokens),
    so making experience needs no actor forward at all. ``ref_logprobs`` (B, R) may be passed
    when already known (the fused runtime computes them while the generation tail runs).

    Advantages are *not* whitened here: under data parallelism the statistics must cover the
    global batch, so the caller reduces them and calls ``whiten_advantages``.
    """
    was_training = models.critic.training
    models.critic.eval()
    old_logprobs = batch.behaviour_logprobs
    if ref_logprobs is None:
        with models.reference_mode() as reference:
            ref_logprobs = response_logprobs(reference, batch)
    values = response_values(models.critic, batch) * batch.response_mask
    rewards, kl = kl_penalized_rewards(
        scores, old_logprobs, ref_logprobs, batch.response_mask, cfg.kl_coef, score_clip=cfg.score_clip
    )
    advantages, returns = gae(rewards, values, batch.response_mask, cfg.gamma, cfg.lam)
    models.critic.train(was_training)
    tokens = float(batch.response_mask.sum())
    stats = {
        "score_mean": float(scores.mean()),
        "kl_mean": float(kl.sum() / tokens),
        "response_tokens": tokens,
    }
    return Experience(batch, old_logprobs, ref_logprobs, values, scores, advantages, returns, stats)


def advantage_moments(exp: Experience) -> Tensor:
    """``[count, sum, sum of squares]`` of valid advantages: all-reduce these across ranks."""
    mask = exp.batch.response_mask
    adv = exp.advantages
    return torch.stack([mask.sum(), (adv * mask).sum(), (adv * adv * mask).sum()]).double()


def whiten_advantages(exp: Experience, moments: Tensor) -> None:
    """Whiten ``exp.advantages`` in place with (global) ``advantage_moments``; unbiased variance."""
    count, total, squares = (float(x) for x in moments)
    if count < 2:
        raise ValueError(f"whitening needs at least 2 valid tokens, got {count}")
    mean = total / count
    var = (squares - count * mean * mean) / (count - 1)
    exp.advantages = whiten(
        exp.advantages,
        exp.batch.response_mask,
        mean=torch.tensor(mean, dtype=exp.advantages.dtype),
        var=torch.tensor(max(var, 0.0), dtype=exp.advantages.dtype),
    )
