"""The PPO trainer the Kafka consumer drives: rollouts + rewards in, versioned checkpoints out.

The consumer calls ``add_rollout`` and ``add_reward`` as events arrive (in any order: a reward
may precede its rollout), ``score_expired`` periodically (rollouts whose feedback did not come
within ``reward_timeout_s`` are scored by the reward model), and ``step()`` whenever ``ready()``.
``step`` runs one PPO update (actor + critic) and returns the stored checkpoint to announce.

Multi-process (data parallel): every rank runs its own ``Trainer`` on its share of the events;
``ready()`` and ``step()`` are collectives, so all ranks call them in the same sequence. Losses
are normalised by global token counts and advantages whitened with global moments, so N ranks
with B rollouts each compute exactly the update one process would on the N*B rollouts.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from core.rlhf.ppo import PPOConfig, policy_loss, value_loss
from workers.trainer.batch import (
    Experience,
    Rollout,
    advantage_moments,
    collate,
    make_experience,
    response_logprobs,
    response_values,
    score_with_reward_model,
    whiten_advantages,
)
from workers.trainer.checkpoint import CheckpointMeta, export_actor_weights, write_checkpoint
from workers.trainer.distributed import Collective
from workers.trainer.models import PolicyModels

RewardFn = Callable[[Sequence[Rollout]], list[float]]


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
    reward_timeout_s: float = 300.0
    """After this long without feedback a rollout is scored by the reward model."""
    max_staleness: int | None = None
    """Drop rollouts generated more than this many published versions ago (None: keep all)."""
    initial_version: str = "base"
    """Version string of the weights the trainer starts from (what workers serve first)."""
    max_early_rewards: int = 100_000
    """Rewards whose rollout has not arrived yet are kept up to this many (oldest dropped)."""
    seed: int = 0
    ppo: PPOConfig = field(default_factory=PPOConfig)

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.minibatch_size < 1 or self.batch_size % self.minibatch_size:
            raise ValueError(f"minibatch_size ({self.minibatch_size}) must divide batch_size ({self.batch_size})")
        if self.ppo_epochs < 1:
            raise ValueError(f"ppo_epochs must be >= 1, got {self.ppo_epochs}")
        if self.reward_timeout_s < 0:
            raise ValueError(f"reward_timeout_s must be >= 0, got {self.reward_timeout_s}")


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
        reward_fn: RewardFn | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.models = models
        self.cfg = cfg
        self.collective = collective or Collective()
        self.clock = clock
        if reward_fn is None and models.reward is not None:
            reward_model = models.reward

            def reward_fn(rollouts: Sequence[Rollout]) -> list[float]:
                return score_with_reward_model(reward_model, rollouts, models.pad_token_id)

        self.reward_fn = reward_fn
        self.pending: OrderedDict[str, Rollout] = OrderedDict()
        self.early_rewards: OrderedDict[str, float] = OrderedDict()
        self.ready_queue: list[tuple[Rollout, float]] = []
        self.versions: list[str] = [cfg.initial_version]
        self.step_count = 0
        self.counters = {
            "rollouts": 0,
            "stale_dropped": 0,
            "duplicates": 0,
            "model_scored": 0,
            "expired_unscored": 0,
        }
        self.actor_opt: torch.optim.Optimizer = torch.optim.AdamW(models.actor_parameters(), lr=cfg.actor_lr)
        self.critic_opt: torch.optim.Optimizer = torch.optim.AdamW(models.critic_parameters(), lr=cfg.critic_lr)
        # Identical weights on every rank (rank 0's wins), frozen models included: a rank with a
        # different reference or reward model would compute different advantages.
        for module in (models.actor, models.critic, models.reference, models.reward):
            if module is not None:
                self.collective.broadcast_module(module)

    @property
    def version(self) -> str:
        return self.versions[-1]

    # ----------------------------------------------------------------- ingestion

    def add_rollout(self, rollout: Rollout, now: float | None = None) -> bool:
        """Buffer a rollout; False if dropped (stale version or duplicate request id)."""
        rid = rollout.request_id
        if rid in self.pending or any(r.request_id == rid for r, _ in self.ready_queue):
            self.counters["duplicates"] += 1
            return False
        if self.cfg.max_staleness is not None:
            recent = self.versions[-(self.cfg.max_staleness + 1) :]
            if rollout.model_version not in recent:
                self.counters["stale_dropped"] += 1
                return False
        self.counters["rollouts"] += 1
        stamped = rollout if rollout.created_at else _restamp(rollout, self.clock() if now is None else now)
        if rid in self.early_rewards:
            self.ready_queue.append((stamped, self.early_rewards.pop(rid)))
        else:
            self.pending[rid] = stamped
        return True

    def add_reward(self, request_id: str, reward: float) -> None:
        """Attach a scalar reward (from feedback) to a rollout, now or when it arrives."""
        if request_id in self.pending:
            self.ready_queue.append((self.pending.pop(request_id), float(reward)))
            return
        self.early_rewards[request_id] = float(reward)
        self.early_rewards.move_to_end(request_id)
        while len(self.early_rewards) > self.cfg.max_early_rewards:
            self.early_rewards.popitem(last=False)

    def score_expired(self, now: float | None = None) -> list[str]:
        """Score rollouts that waited longer than the timeout with the reward model.

        Returns the request ids scored. Without a reward function they are dropped instead.
        """
        now = self.clock() if now is None else now
        expired = [r for r in self.pending.values() if now - r.created_at >= self.cfg.reward_timeout_s]
        if not expired:
            return []
        for r in expired:
            del self.pending[r.request_id]
        if self.reward_fn is None:
            self.counters["expired_unscored"] += len(expired)
            return []
        scores = self.reward_fn(expired)
        self.ready_queue.extend(zip(expired, scores, strict=True))
        self.counters["model_scored"] += len(expired)
        return [r.request_id for r in expired]

    def ready(self) -> bool:
        """True when every rank holds a full batch (a collective when data parallel)."""
        flag = torch.tensor([1 if len(self.ready_queue) >= self.cfg.batch_size else 0])
        return bool(self.collective.all_reduce_min(flag).item())

    # ----------------------------------------------------------------- training

    def step(self) -> StepResult:
        """One PPO update on the oldest ``batch_size`` rewarded rollouts; publish a checkpoint."""
        cfg = self.cfg
        if len(self.ready_queue) < cfg.batch_size:
            raise ValueError(f"step() needs {cfg.batch_size} rewarded rollouts, have {len(self.ready_queue)}")
        taken, self.ready_queue = self.ready_queue[: cfg.batch_size], self.ready_queue[cfg.batch_size :]
        rollouts = [r for r, _ in taken]
        scores = torch.tensor([s for _, s in taken], dtype=torch.float32)
        batch = collate(rollouts, self.models.pad_token_id)
        exp = make_experience(self.models, batch, scores, cfg.ppo)
        if cfg.ppo.whiten_advantages:
            whiten_advantages(exp, self.collective.all_reduce_sum(advantage_moments(exp)))
        metrics = self._update(exp)
        self.step_count += 1
        version = f"v{self.step_count}"
        self.versions.append(version)
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


def _restamp(rollout: Rollout, now: float) -> Rollout:
    return replace(rollout, created_at=now)
