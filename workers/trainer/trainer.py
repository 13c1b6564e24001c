"""The data-parallel PPO trainer: rollouts + rewards in, versioned checkpoints out.

The caller calls ``add_rollout`` and ``add_reward`` as events arrive (in any order: a reward
may precede its rollout), ``expire`` periodically (rollouts whose reward did not come within
``reward_timeout_s`` are dropped and counted: nothing here ever scores a rollout), and
``step()`` whenever ``ready()``. ``step`` runs one PPO update (actor + critic) with the rollouts'
behaviour log-probs as the "old" log-probs (see ``core.rlhf.buffer`` for the off-policy rules)
and returns the stored checkpoint to announce.

The live service runs the stage-fused runtime instead (``workers.trainer.live``); this class is
the data-parallel baseline of ``flywheel bench rlhf`` and the reference its tests compare with.

Multi-process (data parallel): every rank runs its own ``Trainer`` on its share of the events;
``ready()`` and ``step()`` are collectives, so all ranks call them in the same sequence. Losses
are normalised by global token counts and advantages whitened with global moments, so N ranks
with B rollouts each compute exactly the update one process would on the N*B rollouts.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from core.rlhf.buffer import OffPolicyConfig, Rollout, RolloutBuffer
from core.rlhf.ppo import PPOConfig, policy_loss, value_loss
from workers.trainer.batch import (
    Experience,
    advantage_moments,
    collate,
    make_experience,
    response_logprobs,
    response_values,
    whiten_advantages,
)
from workers.trainer.checkpoint import CheckpointMeta, export_actor_weights, write_checkpoint
from workers.trainer.distributed import Collective
from workers.trainer.models import PolicyModels


@dataclass(frozen=True)
class TrainerConfig:
    store_root: Path
    """Where checkpoints are stored, content-addressed (``<store_root>/<sha256>/``)."""
    batch_size: int = 8
    """Rollouts per PPO step on each rank."""
    minibatch_size: int = 4
    """Rollouts per optimiser step on each rank; must divide ``batch_size``."""
    ppo_epochs: int = 1
    actor_lr: float = 1e-5
    critic_lr: float = 1e-5
    max_grad_norm: float | None = 1.0
    initial_version: str = "base"
    """Version string of the weights the trainer starts from (what workers serve first)."""
    seed: int = 0
    ppo: PPOConfig = field(default_factory=PPOConfig)
    off_policy: OffPolicyConfig = field(default_factory=OffPolicyConfig)
    """Staleness bound, adapter-served samples, reward timeout (``core.rlhf.buffer``)."""

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.minibatch_size < 1 or self.batch_size % self.minibatch_size:
            raise ValueError(f"minibatch_size ({self.minibatch_size}) must divide batch_size ({self.batch_size})")
        if self.ppo_epochs < 1:
            raise ValueError(f"ppo_epochs must be >= 1, got {self.ppo_epochs}")


@dataclass(frozen=True)
class StepResult:
    version: str
    step: int
    checkpoint_dir: Path | None
    """The stored checkpoint (rank 0 only; other ranks hold identical weights and get None)."""
    digest: str | None
    metrics: dict[str, float]


class Trainer:
    """Buffers rollouts and rewards; one ``step()`` = one PPO update + one published checkpoint."""

    def __init__(
        self,
        models: PolicyModels,
        cfg: TrainerConfig,
        collective: Collective | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.models = models
        self.cfg = cfg
        self.collective = collective or Collective()
        self.clock = clock
        self.buffer = RolloutBuffer(cfg.off_policy, versions=[cfg.initial_version])
        self.step_count = 0
        self.actor_opt: torch.optim.Optimizer = torch.optim.AdamW(models.actor_parameters(), lr=cfg.actor_lr)
        self.critic_opt: torch.optim.Optimizer = torch.optim.AdamW(models.critic_parameters(), lr=cfg.critic_lr)
        # Identical weights on every rank (rank 0's wins), frozen models included: a rank with a
        # different reference would compute different advantages.
        for module in (models.actor, models.critic, models.reference):
            if module is not None:
                self.collective.broadcast_module(module)

    @property
    def version(self) -> str:
        return self.buffer.version

    @property
    def versions(self) -> list[str]:
        return self.buffer.versions

    @property
    def counters(self) -> dict[str, int]:
        return self.buffer.counters

    # ----------------------------------------------------------------- ingestion

    def add_rollout(self, rollout: Rollout, now: float | None = None) -> bool:
        """Buffer a rollout; False if dropped (duplicate, stale, excluded; counted)."""
        return self.buffer.add(rollout, self.clock() if now is None else now)

    def add_reward(self, request_id: str, reward: float) -> None:
        self.buffer.add_reward(request_id, reward)

    def expire(self, now: float | None = None) -> list[str]:
        """Drop rollouts that waited ``reward_timeout_s`` without a reward; returns their ids."""
        return self.buffer.expire(self.clock() if now is None else now)

    def ready(self) -> bool:
        """True when every rank holds a full batch (a collective when data parallel)."""
        self.buffer.drop_stale()
        flag = torch.tensor([1 if self.buffer.n_ready() >= self.cfg.batch_size else 0])
        return bool(self.collective.all_reduce_min(flag).item())

    # ----------------------------------------------------------------- training

    def step(self) -> StepResult:
        """One PPO update on the oldest ``batch_size`` rewarded rollouts; publish a checkpoint."""
        cfg = self.cfg
        if self.buffer.n_ready() < cfg.batch_size:
            raise ValueError(f"step() needs {cfg.batch_size} rewarded rollouts, have {self.buffer.n_ready()}")
        taken = self.buffer.take(cfg.batch_size)
        rollouts = [r for r, _ in taken]
        scores = torch.tensor([s for _, s in taken], dtype=torch.float32)
        batch = collate(rollouts, self.models.pad_token_id)
        exp = make_experience(self.models, batch, scores, cfg.ppo)
        if cfg.ppo.whiten_advantages:
            whiten_advantages(exp, self.collective.all_reduce_sum(advantage_moments(exp)))
        metrics = self._update(exp)
        self.step_count += 1
        version = f"v{self.step_count}"
        self.buffer.published(version)
        checkpoint_dir, digest = None, None
        if self.collective.rank == 0:
            meta = CheckpointMeta(base_model=self.models.base_model, version=version, step=self.step_count)
            digest, checkpoint_dir = write_checkpoint(export_actor_weights(self.models.actor), meta, cfg.store_root)
        metrics.update(exp.stats)
        metrics.update({k: float(v) for k, v in self.counters.items()})
        return StepResult(
            version=version,
            step=self.step_count,
            checkpoint_dir=checkpoint_dir,
            digest=digest,
            metrics=metrics,
        )

    def _update(self, exp: Experience) -> dict[str, float]:
        cfg, models = self.cfg, self.models
        models.actor.train()
        models.critic.train()
        sums = torch.zeros(5, dtype=torch.float64)  # policy loss, value loss, clipfrac, approx_kl, steps
        n = len(exp.batch)
        for epoch in range(cfg.ppo_epochs):
            gen = torch.Generator().manual_seed(cfg.seed * 7919 + self.step_count * 131 + epoch)
            order = torch.randperm(n, generator=gen).tolist()
            for start in range(0, n, cfg.minibatch_size):
                mb = exp.select(order[start : start + cfg.minibatch_size])
                mask = mb.batch.response_mask
                tokens = self.collective.all_reduce_sum(mask.sum().detach().clone())
                self.actor_opt.zero_grad(set_to_none=True)
                logp = response_logprobs(models.actor, mb.batch)
                p_loss, p_stats = policy_loss(
                    logp, mb.old_logprobs, mb.advantages, mask, cfg.ppo.clip_range, normalizer=tokens
                )
                p_loss.backward()
                self._apply(models.actor_parameters(), self.actor_opt)
                self.critic_opt.zero_grad(set_to_none=True)
                values = response_values(models.critic, mb.batch)
                v_loss, _ = value_loss(
                    values, mb.old_values, mb.returns, mask, cfg.ppo.clip_range_value, normalizer=tokens
                )
                v_loss.backward()
                self._apply(models.critic_parameters(), self.critic_opt)
                sums += torch.tensor(
                    [
                        float(p_loss.detach()),
                        float(v_loss.detach()),
                        float(p_stats["clipfrac"]),
                        float(p_stats["approx_kl"]),
                        1.0,
                    ],
                    dtype=torch.float64,
                )
        self.collective.all_reduce_sum(sums)
        steps = float(sums[4])
        world = self.collective.world_size
        return {
            "policy_loss": float(sums[0]) / steps * world,  # each rank's loss is a share of the global one
            "value_loss": float(sums[1]) / steps * world,
            "clipfrac": float(sums[2]) / steps,
            "approx_kl": float(sums[3]) / steps,
        }

    def _apply(self, params: list[torch.nn.Parameter], opt: torch.optim.Optimizer) -> None:
        self.collective.sum_gradients(params)
        if self.cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm)
        opt.step()
