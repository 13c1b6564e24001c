"""Factories for trainer tests: tiny models and rollouts sampled from them."""

from __future__ import annotations

import torch

from workers.trainer.batch import Rollout
from workers.trainer.generation import sample_response
from workers.trainer.models import PolicyModels


def make_rollouts(
    models: PolicyModels,
    n: int,
    seed: int = 0,
    prompt_len: int = 4,
    max_new: int = 6,
    version: str = "base",
    prefix: str = "r",
    prompt: list[int] | None = None,
) -> list[Rollout]:
    """``n`` rollouts with random prompts, sampled from the actor (variable lengths via EOS)."""
    gen = torch.Generator().manual_seed(seed)
    rollouts = []
    for i in range(n):
        ids = prompt or torch.randint(3, 200, (prompt_len + i % 3,), generator=gen).tolist()
        length = 2 + int(torch.randint(0, max_new - 1, (1,), generator=gen))
        tokens, logprobs = sample_response(models.actor, ids, length, gen)
        rollouts.append(
            Rollout(
                request_id=f"{prefix}{i}",
                prompt_token_ids=tuple(ids),
                response_token_ids=tuple(tokens),
                response_logprobs=tuple(logprobs),
                model_version=version,
            )
        )
    return rollouts


def flat_params(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])
