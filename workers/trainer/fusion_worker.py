"""A rank of the fused PPO runtime: one process standing in for one GPU instance.

Each rank holds full copies of the PPO models (``ModelSpec``: tiny Llamas for tests and the
benchmark, SmolLM2 + LoRA live) for generation and inference, and, for pipeline training, one
stage of the actor and one of the critic (rank r: actor stage r, critic stage ``n-1-r``: the two
pipelines run in opposite directions). It obeys the controller (``workers.trainer.fusion``) over
a pipe:

- ``generate`` starts a decode batch (forced lengths, or end-of-sequence tokens and a maximum);
  while samples are live the rank decodes, checking the pipe between steps;
- ``migrate_out``/``migrate_in`` move live samples with their KV caches and samplers to another
  rank over torch.distributed;
- ``score`` runs reference log-probs, critic values (and, in the benchmark, the reward network)
  for finished samples;
- ``train`` runs PPO mini-batches through a pipeline schedule (stage-local optimisers, global
  gradient-norm clipping), then re-syncs the trained tensors; ``train_dp`` is the data-parallel
  baseline (every rank trains the full models on its share, gradients sum-all-reduced);
- ``export`` (rank 0) stores a checkpoint; ``load`` resumes from one; ``reset``, ``digest``, ``stop``.

A rank counts the seconds it spends computing; everything else is idle time.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from core.rlhf.pipeline import Slot
from core.rlhf.ppo import PPOConfig, policy_loss, token_logprobs, value_loss
from workers.trainer.batch import Rollout, collate, gather_positions
from workers.trainer.checkpoint import (
    CheckpointMeta,
    export_actor_weights,
    load_merged_weights,
    load_trainable_state,
    read_checkpoint,
    read_trainable_state,
    trainable_state,
    write_checkpoint,
)
from workers.trainer.distributed import Collective
from workers.trainer.generation import DecodeBatch, MigrationPayload, sample_generators
from workers.trainer.models import ModelSpec, PolicyModels, causal_lm_logits, decoder_and_head
from workers.trainer.pipeline import ExecutionTrace, StageBinding, backward_flags, make_stages, run_schedule


@dataclass(frozen=True)
class TrainSample:
    """One finished, scored sample with its PPO targets (all per response token)."""

    prompt: tuple[int, ...]
    response: tuple[int, ...]
    old_logprobs: tuple[float, ...]
    """Behaviour log-probs: the PPO ratio's denominator (importance weight for stale samples)."""
    advantages: tuple[float, ...]
    returns: tuple[float, ...]
    old_values: tuple[float, ...]


@dataclass(frozen=True)
class ScoreRequest:
    """What one sample needs from the inference stage."""

    prompt: tuple[int, ...]
    response: tuple[int, ...]
    ref: bool = True
    values: bool = True
    reward: bool = False


class BusyClock:
    """Compute seconds per category, wall-clock and this thread's CPU time.

    Wall time is what the idle fraction uses; CPU time shows how much of it was stolen by other
    processes on a shared machine (wall > CPU under contention).
    """

    def __init__(self) -> None:
        self.wall: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)

    @contextmanager
    def track(self, category: str) -> Iterator[None]:
        w0, c0 = time.perf_counter(), time.thread_time()
        try:
            yield
        finally:
            self.wall[category] += time.perf_counter() - w0
            self.cpu[category] += time.thread_time() - c0

    def add(self, category: str, wall: float, cpu: float) -> None:
        self.wall[category] += wall
        self.cpu[category] += cpu

    def summary(self) -> dict[str, float]:
        out = {f"{k}_s": v for k, v in self.wall.items()}
        out.update({f"{k}_cpu_s": v for k, v in self.cpu.items()})
        out["busy_s"] = sum(self.wall.values())
        out["busy_cpu_s"] = sum(self.cpu.values())
        return out


def _pad(rows: list[tuple[float, ...]], width: int) -> Tensor:
    out = torch.zeros(len(rows), width)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row)
    return out


def _trainable(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a rank needs; passed through ``torch.multiprocessing``."""

    world: int
    init_method: str
    """Rendezvous of the ranks' gloo process group (``file://...`` or ``tcp://...``)."""
    conns: list[Connection]
    """Rank ends of the controller pipes, indexed by rank."""
    models: ModelSpec
    ppo: PPOConfig = field(default_factory=PPOConfig)
    actor_lr: float = 1e-4
    critic_lr: float = 1e-4
    max_grad_norm: float | None = 1.0
    optimizer: str = "adamw"
    """``adamw``, or ``sgd`` (tests: the update is then proportional to the gradient)."""
    actor_cuts: tuple[int, ...] | None = None
    """First layer of actor stages 1..n-1 (None: balanced by layer count)."""
    critic_cuts: tuple[int, ...] | None = None
    threads: int = 1
    pin: bool = False
    """Pin rank r to the r-th allowed CPU (one core per simulated GPU instance)."""


class FusionWorker:
    def __init__(self, rank: int, conn: Connection, spec: WorkerSpec) -> None:
        self.rank, self.world, self.conn, self.spec = rank, spec.world, conn, spec
        self.ppo = spec.ppo
        self.collective = Collective(dist.group.WORLD)
        self.models: PolicyModels = spec.models.build()
        for m in (self.models.actor, self.models.critic):
            m.eval()
        # Every rank starts from rank 0's trainable tensors (frozen ones come from the same recipe).
        for p in [*_trainable(self.models.actor), *_trainable(self.models.critic)]:
            dist.broadcast(p.data, src=0)
        decoder, head = decoder_and_head(self.models.actor)
        self.hidden_size = int(decoder.config.hidden_size)
        self.actor_stages = make_stages(decoder, head, self.world, spec.actor_cuts)
        self.critic_stages = make_stages(
            self.models.critic.backbone, self.models.critic.value_head, self.world, spec.critic_cuts
        )
        self.actor_backward = backward_flags(self.actor_stages)
        self.critic_backward = backward_flags(self.critic_stages)
        self.actor_stage = rank
        self.critic_stage = self.world - 1 - rank
        self.initial = trainable_state(self.models.actor, self.models.critic)
        self.batch: DecodeBatch | None = None
        self.clock = BusyClock()
        self._reset_optimizers()

    # ------------------------------------------------------------------ optimisers

    def _optimizer(self, params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer | None:
        if not params:
            return None
        if self.spec.optimizer == "sgd":
            return torch.optim.SGD(params, lr=lr)
        return torch.optim.AdamW(params, lr=lr)

    def _reset_optimizers(self) -> None:
        s = self.spec
        self.actor_opt = self._optimizer(_trainable(self.actor_stages[self.actor_stage]), s.actor_lr)
        self.critic_opt = self._optimizer(_trainable(self.critic_stages[self.critic_stage]), s.critic_lr)
        self.dp_actor_opt = self._optimizer(_trainable(self.models.actor), s.actor_lr)
        self.dp_critic_opt = self._optimizer(_trainable(self.models.critic), s.critic_lr)

    # ------------------------------------------------------------------ loop

    def serve(self) -> None:
        while True:
            if self.batch is not None and len(self.batch):
                if self.conn.poll():
                    if not self.handle(self.conn.recv()):
                        return
                    continue
                with self.clock.track("generate"):
                    done = self.batch.step()
                self._report_finished(done)
            elif not self.handle(self.conn.recv()):
                return

    def _report_finished(self, done: list[int]) -> None:
        if done and self.batch is not None:
            self.conn.send(("finished", self.rank, [(s, *self.batch.finished[s]) for s in done]))

    def handle(self, cmd: tuple[Any, ...]) -> bool:
        kind = cmd[0]
        if kind == "stop":
            return False
        if kind == "reset":
            load_trainable_state(self.models.actor, self.models.critic, self.initial)
            self._reset_optimizers()
            self.batch, self.clock = None, BusyClock()
            self.conn.send(("ok", self.rank))
        elif kind == "generate":
            _, items, seed, eos_ids = cmd
            with self.clock.track("generate"):
                ids = [sid for sid, _, _ in items]
                self.batch = DecodeBatch(
                    self.models.actor,
                    ids,
                    [prompt for _, prompt, _ in items],
                    [target for _, _, target in items],
                    sample_generators(seed, ids),
                    eos_ids=None if eos_ids is None else frozenset(eos_ids),
                    pad_token_id=self.models.pad_token_id,
                )
            self._report_finished(sorted(self.batch.finished))
        elif kind == "migrate_out":
            with self.clock.track("migrate"):
                payload = self.batch.extract() if self.batch is not None else None
                dist.send_object_list([payload], dst=cmd[1])
        elif kind == "migrate_in":
            received: list[MigrationPayload | None] = [None]
            dist.recv_object_list(received, src=cmd[1])
            payload = received[0]
            with self.clock.track("migrate"):
                if payload is not None and payload.sample_ids:
                    if self.batch is None or not len(self.batch):
                        self.batch = DecodeBatch(self.models.actor, [], [], [], [], eos_ids=cmd[2],
                                                 pad_token_id=self.models.pad_token_id)
                    self.batch.absorb(payload)
        elif kind == "score":
            self.conn.send(("scored", self.rank, cmd[1], self.score(cmd[2])))
        elif kind == "train":
            self.conn.send(("trained", self.rank, self.train(*cmd[1:])))
        elif kind == "train_dp":
            self.conn.send(("trained", self.rank, self.train_dp(*cmd[1:])))
        elif kind == "export":
            self.conn.send(("exported", self.rank, *self.export(Path(cmd[1]), cmd[2])))
        elif kind == "load":
            self.load(Path(cmd[1]))
            self.conn.send(("ok", self.rank))
        elif kind == "digest":
            self.conn.send(("digest", self.rank, self.digest()))
        elif kind == "profile":
            from workers.trainer.fusion_plan import profile_models

            rows, length, vocab = cmd[1:]
            times = profile_models(self.models, self.world, rows, length, vocab, actor_cuts=self.spec.actor_cuts,
                                   critic_cuts=self.spec.critic_cuts, repeats=3)
            self.conn.send(("profiled", self.rank, times))
        else:
            raise ValueError(f"unknown command {kind!r}")
        return True

    # ------------------------------------------------------------------ inference

    @torch.no_grad()
    def score(self, requests: list[ScoreRequest]) -> list[dict[str, Any]]:
        """Reference log-probs, critic values and (benchmark) reward of finished samples."""
        out: list[dict[str, Any]] = [{} for _ in requests]
        models = self.models
        with self.clock.track("score"):
            for key in ("ref", "values", "reward"):
                rows = [i for i, r in enumerate(requests) if getattr(r, key)]
                if not rows:
                    continue
                rollouts = [
                    Rollout(str(i), requests[i].prompt, requests[i].response, (0.0,) * len(requests[i].response), "")
                    for i in rows
                ]
                batch = collate(rollouts, models.pad_token_id)
                if key == "ref":
                    with models.reference_mode() as reference:
                        logits = causal_lm_logits(reference, batch.input_ids)
                    values = token_logprobs(gather_positions(logits, batch.response_positions), batch.response_tokens)
                elif key == "values":
                    values = gather_positions(models.critic(batch.input_ids), batch.response_positions)
                else:
                    if models.reward is None:
                        raise ValueError("a reward was requested but these models have no reward network")
                    scores = models.reward.score(batch.input_ids, batch.lengths).tolist()
                    for row, i in enumerate(rows):
                        out[i]["reward"] = float(scores[row])
                    continue
                for row, i in enumerate(rows):
                    out[i][key] = values[row, : len(requests[i].response)].tolist()
        return out

    # ------------------------------------------------------------------ training

    def _microbatch(self, samples: dict[int, TrainSample], ids: list[int]) -> dict[str, Tensor]:
        chosen = [samples[i] for i in ids]
        rollouts = [Rollout(str(i), s.prompt, s.response, s.old_logprobs, "") for i, s in zip(ids, chosen, strict=True)]
        batch = collate(rollouts, self.models.pad_token_id)
        width = batch.response_mask.shape[1]
        return {
            "input_ids": batch.input_ids,
            "positions": batch.response_positions,
            "tokens": batch.response_tokens,
            "mask": batch.response_mask,
            "old_logprobs": batch.behaviour_logprobs,
            "advantages": _pad([s.advantages for s in chosen], width),
            "returns": _pad([s.returns for s in chosen], width),
            "old_values": _pad([s.old_values for s in chosen], width),
        }

    def _loss(self, model: int, out: Tensor, mb: dict[str, Tensor], tokens: float, stats: Tensor) -> Tensor:
        """PPO loss share of one micro-batch; accumulates [policy, value, clipfrac, approx_kl, tokens]."""
        cfg = self.ppo
        n = float(mb["mask"].sum())
        if model == 0:
            logp = token_logprobs(gather_positions(out, mb["positions"]), mb["tokens"])
            loss, info = policy_loss(
                logp, mb["old_logprobs"], mb["advantages"], mb["mask"], cfg.clip_range, normalizer=tokens
            )
            stats[0] += float(loss.detach())
            stats[2] += float(info["clipfrac"]) * n
            stats[3] += float(info["approx_kl"]) * n
            stats[4] += n
        else:
            values = gather_positions(out.squeeze(-1), mb["positions"])
            loss, _ = value_loss(
                values, mb["old_values"], mb["returns"], mb["mask"], cfg.clip_range_value, normalizer=tokens
            )
            stats[1] += float(loss.detach())
        return loss

    def _binding(self, model: int, prepared: list[dict[str, Tensor]], tokens: float, stats: Tensor) -> StageBinding:
        stages = self.actor_stages if model == 0 else self.critic_stages
        flags = self.actor_backward if model == 0 else self.critic_backward
        s = self.actor_stage if model == 0 else self.critic_stage
        # Actor stage s lives on rank s; critic stage s on rank n-1-s.
        rank_of = (lambda st: st) if model == 0 else (lambda st: self.world - 1 - st)

        def loss_fn(out: Tensor, k: int) -> Tensor:
            return self._loss(model, out, prepared[k], tokens, stats)

        return StageBinding(
            stage=stages[s],
            stage_index=s,
            n_stages=self.world,
            prev_rank=None if s == 0 else rank_of(s - 1),
            next_rank=None if s == self.world - 1 else rank_of(s + 1),
            inputs=[p["input_ids"] for p in prepared],
            hidden_size=self.hidden_size,
            loss_fn=loss_fn,
            has_backward=flags[s],
            needs_input_grad=s > 0 and flags[s - 1],
        )

    def _clip_and_step(self, groups: list[tuple[list[nn.Parameter], torch.optim.Optimizer | None]], dp: bool) -> None:
        """Clip each model's gradient to a *global* norm (summed over ranks unless ``dp``), then step."""
        max_norm = self.spec.max_grad_norm
        if max_norm is not None:
            sq = torch.tensor(
                [sum(float(p.grad.pow(2).sum()) for p in params if p.grad is not None) for params, _ in groups],
                dtype=torch.float64,
            )
            if not dp:  # pipeline stages hold disjoint parameters: the norm sums over ranks
                self.collective.all_reduce_sum(sq)
            for (params, _), total in zip(groups, sq.tolist(), strict=True):
                coef = max_norm / (total**0.5 + 1e-6)
                if coef < 1.0:
                    for p in params:
                        if p.grad is not None:
                            p.grad.mul_(coef)
        for _, opt in groups:
            if opt is not None:
                opt.step()

    def train(
        self, samples: dict[int, TrainSample], minibatches: list[list[list[int]]], orders: list[list[Slot]]
    ) -> dict[str, float]:
        """PPO over ``minibatches`` (each a list of micro-batches of sample ids), one pipeline flush each."""
        trace = ExecutionTrace()
        wall = time.perf_counter()
        stats = torch.zeros(5, dtype=torch.float64)
        actor_params = _trainable(self.actor_stages[self.actor_stage])
        critic_params = _trainable(self.critic_stages[self.critic_stage])
        for flush, (micro, order) in enumerate(zip(minibatches, orders, strict=True)):
            prepared = [self._microbatch(samples, ids) for ids in micro]
            tokens = float(sum(p["mask"].sum() for p in prepared))
            bindings = {0: self._binding(0, prepared, tokens, stats), 1: self._binding(1, prepared, tokens, stats)}
            for opt in (self.actor_opt, self.critic_opt):
                if opt is not None:
                    opt.zero_grad(set_to_none=True)
            run_schedule(order, bindings, flush=flush, trace=trace)
            with self.clock.track("optimizer"):
                self._clip_and_step([(actor_params, self.actor_opt), (critic_params, self.critic_opt)], dp=False)
        self.clock.add("train", trace.busy_s, trace.busy_cpu_s)
        with self.clock.track("sync"):
            self._sync_weights()
        return self._finish(wall, stats)

    def train_dp(self, samples: dict[int, TrainSample], minibatches: list[list[list[int]]]) -> dict[str, float]:
        """Data-parallel baseline: rank r trains the full models on micro-batches r, r+n, ... of
        each mini-batch; gradients are sum-all-reduced (losses use the mini-batch's global token
        count, so the sum is the single-process gradient)."""
        wall = time.perf_counter()
        stats = torch.zeros(5, dtype=torch.float64)
        actor, critic = self.models.actor, self.models.critic
        actor_params, critic_params = _trainable(actor), _trainable(critic)
        for micro in minibatches:
            prepared = [self._microbatch(samples, ids) for ids in micro]
            tokens = float(sum(p["mask"].sum() for p in prepared))
            for opt in (self.dp_actor_opt, self.dp_critic_opt):
                if opt is not None:
                    opt.zero_grad(set_to_none=True)
            with self.clock.track("train"):
                for k in range(self.rank, len(prepared), self.world):
                    mb = prepared[k]
                    self._loss(0, causal_lm_logits(actor, mb["input_ids"]), mb, tokens, stats).backward()
                    self._loss(1, critic.value_head(critic.backbone(input_ids=mb["input_ids"]).last_hidden_state),
                               mb, tokens, stats).backward()
            with self.clock.track("allreduce"):
                self.collective.sum_gradients(actor_params)
                self.collective.sum_gradients(critic_params)
            with self.clock.track("optimizer"):
                self._clip_and_step([(actor_params, self.dp_actor_opt), (critic_params, self.dp_critic_opt)], dp=True)
        return self._finish(wall, stats)

    def _finish(self, wall: float, stats: Tensor) -> dict[str, float]:
        """The iteration's report (busy seconds since the last one, loss sums); restarts the clock."""
        out = {**self.clock.summary(), "train_wall_s": time.perf_counter() - wall,
               "policy_loss_sum": float(stats[0]), "value_loss_sum": float(stats[1]),
               "clipfrac_tokens": float(stats[2]), "approx_kl_tokens": float(stats[3]),
               "policy_tokens": float(stats[4])}
        self.clock = BusyClock()
        return out

    @torch.no_grad()
    def _sync_weights(self) -> None:
        """Every rank broadcasts the trainable tensors of the stages it trained."""
        for s in range(self.world):
            for p in _trainable(self.actor_stages[s]):
                dist.broadcast(p.data, src=s)
            for p in _trainable(self.critic_stages[s]):
                dist.broadcast(p.data, src=self.world - 1 - s)

    # ------------------------------------------------------------------ checkpoints

    def export(self, store_root: Path, meta: CheckpointMeta) -> tuple[str, str]:
        """Store the current policy (engine weights + trainer state); returns (digest, path)."""
        weights = export_actor_weights(self.models.actor)
        state = trainable_state(self.models.actor, self.models.critic)
        digest, path = write_checkpoint(weights, meta, store_root, state)
        return digest, str(path)

    def load(self, path: Path) -> None:
        """Resume from a published checkpoint (its trainer state; else its merged weights)."""
        state = read_trainable_state(path)
        if state is not None:
            load_trainable_state(self.models.actor, self.models.critic, state)
        else:
            _, weights = read_checkpoint(path)
            load_merged_weights(self.models.actor, weights)
        self._reset_optimizers()

    def digest(self) -> str:
        """SHA-256 of the trainable tensors (to check that ranks agree)."""
        h = hashlib.sha256()
        for module in (self.models.actor, self.models.critic):
            for p in _trainable(module):
                h.update(p.detach().numpy().tobytes())
        return h.hexdigest()


def worker_main(rank: int, spec: WorkerSpec) -> None:
    """Process entry point (``torch.multiprocessing.start_processes``)."""
    torch.set_num_threads(spec.threads)
    if spec.pin and hasattr(os, "sched_setaffinity"):
        cpus = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpus[rank % len(cpus)]})
    dist.init_process_group("gloo", init_method=spec.init_method, rank=rank, world_size=spec.world)
    conn = spec.conns[rank]
    try:
        worker = FusionWorker(rank, conn, spec)
        conn.send(("ready", rank))
        worker.serve()
    finally:
        dist.destroy_process_group()
