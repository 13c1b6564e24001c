"""A worker process standing in for one GPU instance in a fused (or unfused) PPO iteration.

Each worker holds full copies of the four tiny models (for generation and inference) and, for
training, one pipeline stage of the actor and one of the critic (worker r: actor stage r, critic
stage ``n-1-r``: the two pipelines run in opposite directions). It is pinned to one CPU core with
one torch thread, and obeys commands from the controller (``workers.trainer.fusion``) over a pipe:

``generate`` (start a decode batch), ``migrate_out``/``migrate_in`` (move live samples and their
KV caches to/from another worker over torch.distributed), ``score`` (reference log-probs, critic
values and reward for finished samples), ``train`` (PPO mini-batches through a pipeline schedule,
then weight re-sync), ``reset`` and ``stop``. While it has live samples it decodes, checking the
pipe between steps. It counts the seconds it spends computing; everything else is idle time.
"""

from __future__ import annotations

import copy
import hashlib
import os
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import Tensor
from transformers import LlamaForCausalLM

from core.rlhf.pipeline import Slot
from core.rlhf.ppo import PPOConfig, policy_loss, token_logprobs, value_loss
from workers.trainer.batch import Rollout, collate, gather_positions
from workers.trainer.generation import DecodeBatch, MigrationPayload
from workers.trainer.models import PolicyModels, build_tiny_models, causal_lm_logits, tiny_llama_config
from workers.trainer.pipeline import ExecutionTrace, StageBinding, make_stages, run_schedule


@dataclass(frozen=True)
class TrainSample:
    """One finished, scored sample with its PPO targets (all per response token)."""

    prompt: tuple[int, ...]
    response: tuple[int, ...]
    old_logprobs: tuple[float, ...]
    advantages: tuple[float, ...]
    returns: tuple[float, ...]
    old_values: tuple[float, ...]


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


class FusionWorker:
    def __init__(
        self,
        rank: int,
        world: int,
        conn: Connection,
        *,
        model_kwargs: dict[str, Any],
        ppo: PPOConfig,
        lr: float,
        seed: int,
    ) -> None:
        self.rank, self.world, self.conn = rank, world, conn
        self.ppo, self.lr = ppo, lr
        self.models: PolicyModels = build_tiny_models(tiny_llama_config(**model_kwargs), seed=seed)
        for m in (self.models.actor, self.models.critic):
            m.eval()
        self.initial = {
            "actor": copy.deepcopy(self.models.actor.state_dict()),
            "critic": copy.deepcopy(self.models.critic.state_dict()),
        }
        actor = cast(LlamaForCausalLM, self.models.actor)
        self.hidden_size = int(actor.config.hidden_size)
        self.actor_stages = make_stages(actor.model, actor.lm_head, world)
        self.critic_stages = make_stages(self.models.critic.backbone, self.models.critic.value_head, world)
        self.actor_stage = rank
        self.critic_stage = world - 1 - rank
        self.batch: DecodeBatch | None = None
        self.clock = BusyClock()
        self._reset_optimizers()

    def _reset_optimizers(self) -> None:
        self.actor_opt = torch.optim.AdamW(self.actor_stages[self.actor_stage].parameters(), lr=self.lr)
        self.critic_opt = torch.optim.AdamW(self.critic_stages[self.critic_stage].parameters(), lr=self.lr)

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
            self.models.actor.load_state_dict(self.initial["actor"])
            self.models.critic.load_state_dict(self.initial["critic"])
            self._reset_optimizers()
            self.batch, self.clock = None, BusyClock()
            self.conn.send(("ok", self.rank))
        elif kind == "generate":
            _, ids, prompts, targets, seed = cmd
            with self.clock.track("generate"):
                gen = torch.Generator().manual_seed(seed)
                self.batch = DecodeBatch(self.models.actor, ids, prompts, targets, gen)
            self._report_finished(sorted(self.batch.finished))
        elif kind == "migrate_out":
            with self.clock.track("migrate"):
                payload = self.batch.extract() if self.batch is not None else None
                dist.send_object_list([payload], dst=cmd[1])
            self.conn.send(("migrated", self.rank, [] if payload is None else payload.sample_ids))
        elif kind == "migrate_in":
            received: list[MigrationPayload | None] = [None]
            dist.recv_object_list(received, src=cmd[1])
            payload = received[0]
            with self.clock.track("migrate"):
                if payload is not None and payload.sample_ids:
                    if self.batch is None:
                        gen = torch.Generator().manual_seed(cmd[2])
                        empty = torch.zeros(0, 1, dtype=torch.long)
                        self.batch = DecodeBatch(self.models.actor, [], empty, [], gen)
                    self.batch.absorb(payload)
        elif kind == "score":
            self.conn.send(("scored", self.rank, *self.score(cmd[1], cmd[2])))
        elif kind == "train":
            self.conn.send(("trained", self.rank, self.train(*cmd[1:])))
        elif kind == "digest":
            self.conn.send(("digest", self.rank, self.digest()))
        else:
            raise ValueError(f"unknown command {kind!r}")
        return True

    # ------------------------------------------------------------------ inference

    @torch.no_grad()
    def score(self, ids: list[int], samples: list[tuple[tuple[int, ...], tuple[int, ...]]]) -> tuple[Any, ...]:
        """Reference log-probs, critic values and reward of finished samples (one micro-batch)."""
        rollouts = [Rollout(str(i), p, r, (0.0,) * len(r), "") for i, (p, r) in zip(ids, samples, strict=True)]
        assert self.models.reference is not None and self.models.reward is not None
        with self.clock.track("score"):
            batch = collate(rollouts, self.models.pad_token_id)
            ref = token_logprobs(
                gather_positions(causal_lm_logits(self.models.reference, batch.input_ids), batch.response_positions),
                batch.response_tokens,
            )
            values = gather_positions(self.models.critic(batch.input_ids), batch.response_positions)
            rewards = self.models.reward.score(batch.input_ids, batch.lengths)
        lengths = [len(r) for _, r in samples]
        return (
            ids,
            [ref[i, :n].tolist() for i, n in enumerate(lengths)],
            [values[i, :n].tolist() for i, n in enumerate(lengths)],
            rewards.tolist(),
        )

    # ------------------------------------------------------------------ training

    def train(
        self, samples: dict[int, TrainSample], minibatches: list[list[list[int]]], orders: list[list[Slot]]
    ) -> dict[str, float]:
        """PPO over ``minibatches`` (each a list of micro-batches of sample ids), one flush each."""
        trace = ExecutionTrace()
        wall = time.perf_counter()
        for flush, (micro, order) in enumerate(zip(minibatches, orders, strict=True)):
            prepared = [self._microbatch(samples, ids) for ids in micro]
            tokens = float(sum(p["mask"].sum() for p in prepared))
            bindings = {0: self._binding(0, prepared, tokens), 1: self._binding(1, prepared, tokens)}
            self.actor_opt.zero_grad(set_to_none=True)
            self.critic_opt.zero_grad(set_to_none=True)
            run_schedule(order, bindings, flush=flush, trace=trace)
            with self.clock.track("optimizer"):
                self.actor_opt.step()
                self.critic_opt.step()
        self.clock.add("train", trace.busy_s, trace.busy_cpu_s)
        with self.clock.track("sync"):
            self._sync_weights()
        return {**self.clock.summary(), "train_wall_s": time.perf_counter() - wall}

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

    def _binding(self, model: int, prepared: list[dict[str, Tensor]], tokens: float) -> StageBinding:
        stages = self.actor_stages if model == 0 else self.critic_stages
        s = self.actor_stage if model == 0 else self.critic_stage
        # Actor stage s lives on rank s; critic stage s on rank n-1-s.
        rank_of = (lambda st: st) if model == 0 else (lambda st: self.world - 1 - st)
        cfg = self.ppo

        def loss_fn(out: Tensor, k: int) -> Tensor:
            mb = prepared[k]
            if model == 0:
                logp = token_logprobs(gather_positions(out, mb["positions"]), mb["tokens"])
                loss, _ = policy_loss(
                    logp, mb["old_logprobs"], mb["advantages"], mb["mask"], cfg.clip_range, normalizer=tokens
                )
            else:
                values = gather_positions(out.squeeze(-1), mb["positions"])
                loss, _ = value_loss(
                    values,
                    mb["old_values"],
                    mb["returns"],
                    mb["mask"],
                    cfg.clip_range_value,
                    normalizer=tokens,
                )
            return loss

        return StageBinding(
            stage=stages[s],
            stage_index=s,
            n_stages=self.world,
            prev_rank=None if s == 0 else rank_of(s - 1),
            next_rank=None if s == self.world - 1 else rank_of(s + 1),
            inputs=[p["input_ids"] for p in prepared],
            hidden_size=self.hidden_size,
            loss_fn=loss_fn,
        )

    def digest(self) -> str:
        """SHA-256 of the actor's and critic's parameters (to check that workers agree)."""
        h = hashlib.sha256()
        for module in (self.models.actor, self.models.critic):
            for p in module.parameters():
                h.update(p.detach().numpy().tobytes())
        return h.hexdigest()

    @torch.no_grad()
    def _sync_weights(self) -> None:
        """Every rank broadcasts the stages it trained, so all full copies match again."""
        for s in range(self.world):
            for p in self.actor_stages[s].parameters():
                dist.broadcast(p.data, src=s)
            for p in self.critic_stages[s].parameters():
                dist.broadcast(p.data, src=self.world - 1 - s)


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker process needs; passed through ``torch.multiprocessing``."""

    world: int
    init_file: str
    """``file://`` rendezvous for the workers' gloo process group."""
    conns: list[Connection]
    """Worker ends of the controller pipes, indexed by rank."""
    model_kwargs: dict[str, Any]
    ppo: PPOConfig
    lr: float
    seed: int
    pin: bool
    """Pin rank r to the r-th allowed CPU (one core per simulated GPU instance)."""


def worker_main(rank: int, spec: WorkerSpec) -> None:
    """Process entry point (``torch.multiprocessing.start_processes``)."""
    torch.set_num_threads(1)
    if spec.pin and hasattr(os, "sched_setaffinity"):
        cpus = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpus[rank % len(cpus)]})
    dist.init_process_group("gloo", init_method=f"file://{spec.init_file}", rank=rank, world_size=spec.world)
    conn = spec.conns[rank]
    try:
        worker = FusionWorker(
            rank, spec.world, conn, model_kwargs=spec.model_kwargs, ppo=spec.ppo, lr=spec.lr, seed=spec.seed
        )
        conn.send(("ready", rank))
        worker.serve()
    finally:
        dist.destroy_process_group()
