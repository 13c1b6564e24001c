"""The benchmark's PPO iteration: batch, forced long-tailed lengths, tiny models, partitioning.

``flywheel bench rlhf`` runs this workload through ``workers.trainer.fusion`` in every variant;
forced response lengths make every variant do exactly the same work.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from core.rlhf.pipeline import Schedule
from workers.trainer.fusion import GenerateItem, IterationPlan, partition
from workers.trainer.models import ModelSpec


@dataclass(frozen=True)
class FusionWorkload:
    """One benchmark PPO iteration's work: batch, length distribution, model sizes, partitioning."""

    batch_size: int = 32
    prompt_len: int = 16
    min_len: int = 8
    max_len: int = 128
    length_mu: float = 3.4
    """Log-space mean of the response-length lognormal (exp(3.4) ~ 30 tokens median)."""
    length_sigma: float = 0.8
    n_minibatches: int = 2
    n_microbatches: int = 4
    """Pipeline micro-batches per PPO mini-batch, per model."""
    inference_microbatch: int = 4
    rt: float = 0.2
    lr: float = 1e-4
    seed: int = 0
    model: dict[str, int] = field(
        default_factory=lambda: {
            "vocab_size": 2048,
            "hidden_size": 256,
            "num_layers": 4,
            "num_heads": 4,
            "num_kv_heads": 2,
            "intermediate_size": 704,
        }
    )

    def __post_init__(self) -> None:
        if self.batch_size % (self.n_minibatches * self.n_microbatches):
            raise ValueError(
                f"batch_size {self.batch_size} must divide into {self.n_minibatches} mini-batches "
                f"of {self.n_microbatches} micro-batches"
            )
        if not 1 <= self.min_len <= self.max_len:
            raise ValueError(f"need 1 <= min_len <= max_len, got {self.min_len}, {self.max_len}")

    def spec(self) -> ModelSpec:
        return ModelSpec(kind="tiny", tiny=dict(self.model), seed=self.seed, with_reward=True)

    def prompts(self) -> list[tuple[int, ...]]:
        gen = torch.Generator().manual_seed(self.seed)
        ids = torch.randint(3, self.model["vocab_size"], (self.batch_size, self.prompt_len), generator=gen)
        return [tuple(row) for row in ids.tolist()]

    def plan(self, lengths: Sequence[int], fused: bool, schedule: Schedule | None, rt: float | None = None
             ) -> IterationPlan:
        """The benchmark's synchronous iteration: generate the batch, train on it."""
        items = tuple(GenerateItem(i, p, lengths[i]) for i, p in enumerate(self.prompts()))
        return IterationPlan(
            generate=items,
            train_generated=True,
            fused=fused,
            rt=self.rt if rt is None else rt,
            inference_microbatch=self.inference_microbatch,
            max_batch_per_instance=self.batch_size,
            seed=self.seed,
            n_minibatches=self.n_minibatches,
            n_microbatches=self.n_microbatches,
            schedule=schedule,
        )


def sample_lengths(w: FusionWorkload) -> list[int]:
    """Clipped lognormal response lengths: a controlled, reproducible long tail."""
    rng = random.Random(w.seed)
    return [
        max(w.min_len, min(w.max_len, round(rng.lognormvariate(w.length_mu, w.length_sigma))))
        for _ in range(w.batch_size)
    ]


def partition_minibatches(w: FusionWorkload, lengths: Sequence[int]) -> list[list[list[int]]]:
    """The benchmark's mini-batches (the same cut ``run_iteration`` makes for its first epoch)."""
    return partition(
        {i: w.prompt_len + n for i, n in enumerate(lengths)}, w.n_minibatches, w.n_microbatches, w.seed * 1009 + 1
    )
