"""Controller for one real PPO iteration on worker processes, fused (RLHFuse) or unfused.

The same batch (prompts, forced long-tailed response lengths, models, PPO mini-batches) runs
through both variants:

- **unfused**: each worker decodes its half of the batch to completion; after a barrier both
  score samples (reference, reward, critic); then actor and critic train one after the other,
  each with a 1F1B pipeline over the workers;
- **fused**: ``core.rlhf.interstage.InterStageScheduler`` migrates the tail to one worker when
  unfinished samples fall to ``rt`` of the batch and streams finished samples to free workers
  for scoring; training runs actor and critic together through the simulated-annealing fused
  schedule of ``core.rlhf.anneal`` (opposite-direction pipelines filling each other's bubbles).

Throughput is samples per second of the whole iteration; the idle fraction is idle worker-time
over total worker-time (workers count their own compute seconds).
"""

from __future__ import annotations

import contextlib
import multiprocessing.connection as mpc
import random
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, cast

import torch
import torch.multiprocessing as mp

from core.rlhf.interstage import InterStageConfig, InterStageScheduler, round_robin
from core.rlhf.pipeline import (
    Schedule,
    balance_microbatches,
)
from core.rlhf.ppo import PPOConfig, gae, kl_penalized_rewards, whiten
from workers.trainer.fusion_worker import TrainSample, WorkerSpec, worker_main


@dataclass(frozen=True)
class FusionWorkload:
    """One PPO iteration's work: batch, length distribution, model sizes, PPO partitioning."""

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


def sample_lengths(w: FusionWorkload) -> list[int]:
    """Clipped lognormal response lengths: a controlled, reproducible long tail."""
    rng = random.Random(w.seed)
    return [
        max(w.min_len, min(w.max_len, round(rng.lognormvariate(w.length_mu, w.length_sigma))))
        for _ in range(w.batch_size)
    ]


@dataclass
class IterationReport:
    fused: bool
    wall_s: float
    gen_inference_s: float
    train_s: float
    busy_s: list[float]
    """Per-worker compute seconds (wall clock)."""
    busy_cpu_s: list[float]
    """Per-worker compute seconds (thread CPU time): well below ``busy_s`` on a contended machine."""
    batch_size: int
    migration_at_s: float | None = None
    events: list[tuple[float, str, int, int]] = field(default_factory=list)
    """Controller-side log: (seconds since start, kind, worker, samples) for finished / score /
    scored / migrate."""

    @property
    def samples_per_s(self) -> float:
        return 0.0 if self.wall_s == 0 else self.batch_size / self.wall_s

    @property
    def idle_fraction(self) -> float:
        total = self.wall_s * len(self.busy_s)
        return 0.0 if total == 0 else max(0.0, 1.0 - sum(self.busy_s) / total)


class FusionCluster:
    """Worker processes plus the controller side of the protocol. Use as a context manager."""

    def __init__(
        self, workload: FusionWorkload, n_workers: int = 2, pin: bool = True, start_method: str = "spawn"
    ) -> None:
        """``start_method``: "spawn" (clean workers, the default) or "fork" (fast start, for tests)."""
        self.w = workload
        self.n = n_workers
        self.ppo = PPOConfig()
        self.last_train_stats: dict[int, dict[str, float]] = {}
        self._tmp = tempfile.TemporaryDirectory(prefix="flywheel-fusion-")
        ctx = mp.get_context(start_method)
        pipes = [ctx.Pipe() for _ in range(n_workers)]
        self.conns = [a for a, _ in pipes]
        init_file = str(Path(self._tmp.name) / "init")
        self.procs = mp.start_processes(
            worker_main,
            args=(
                WorkerSpec(
                    world=n_workers,
                    init_file=init_file,
                    conns=[b for _, b in pipes],
                    model_kwargs=workload.model,
                    ppo=self.ppo,
                    lr=workload.lr,
                    seed=workload.seed,
                    pin=pin,
                ),
            ),
            nprocs=n_workers,
            join=False,
            start_method=start_method,
        )
        for conn in self.conns:
            msg = conn.recv()
            assert msg[0] == "ready", msg

    def __enter__(self) -> FusionCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for conn in self.conns:
            with contextlib.suppress(BrokenPipeError, OSError):
                conn.send(("stop",))
        self.procs.join()
        self._tmp.cleanup()

    def digests(self) -> list[str]:
        """Each worker's parameter digest (equal after every iteration's weight re-sync)."""
        for conn in self.conns:
            conn.send(("digest",))
        return [conn.recv()[2] for conn in self.conns]

    # ------------------------------------------------------------------ one iteration

    def run_iteration(
        self, fused: bool, schedule: Schedule, lengths: Sequence[int], rt: float | None = None
    ) -> IterationReport:
        w = self.w
        for conn in self.conns:
            conn.send(("reset",))
        for conn in self.conns:
            assert conn.recv()[0] == "ok"
        gen = torch.Generator().manual_seed(w.seed)
        prompts = torch.randint(3, w.model["vocab_size"], (w.batch_size, w.prompt_len), generator=gen)
        assignment = round_robin(w.batch_size, self.n)
        cfg = InterStageConfig(
            rt=w.rt if rt is None else rt,
            fused=fused,
            max_batch_per_instance=w.batch_size,
            inference_microbatch=w.inference_microbatch,
        )
        sched = InterStageScheduler(assignment, self.n, cfg)
        generated: dict[int, tuple[list[int], list[float]]] = {}
        scored: dict[int, tuple[list[float], list[float], float]] = {}
        start = time.perf_counter()
        migration_at: float | None = None
        events: list[tuple[float, str, int, int]] = []
        for r, conn in enumerate(self.conns):
            ids = [i for i, inst in assignment.items() if inst == r]
            conn.send(("generate", ids, prompts[ids], [lengths[i] for i in ids], w.seed * 100 + r))
        while not sched.done:
            for ready in mpc.wait(self.conns):
                msg: Any = cast(Connection, ready).recv()  # wait() returns the Connections it was given
                now = time.perf_counter() - start
                if msg[0] == "finished":
                    for sid, toks, lps in msg[2]:
                        generated[sid] = (toks, lps)
                    sched.update(finished=[sid for sid, _, _ in msg[2]])
                    events.append((now, "finished", msg[1], len(msg[2])))
                elif msg[0] == "scored":
                    _, rank, ids, refs, values, rewards = msg
                    events.append((now, "scored", rank, len(ids)))
                    for sid, ref, val, rew in zip(ids, refs, values, rewards, strict=True):
                        scored[sid] = (ref, val, rew)
                    sched.update(scored=[(rank, ids)])
            plan = sched.schedule()
            for move in plan.migrations:
                migration_at = time.perf_counter() - start
                events.append((migration_at, "migrate", move.source, len(move.sample_ids)))
                self.conns[move.source].send(("migrate_out", move.target))
                self.conns[move.target].send(("migrate_in", move.source, w.seed))
            for task in plan.inference:
                samples = [(tuple(prompts[s].tolist()), tuple(generated[s][0])) for s in task.sample_ids]
                self.conns[task.instance].send(("score", list(task.sample_ids), samples))
                events.append((time.perf_counter() - start, "score", task.instance, len(task.sample_ids)))
        gen_done = time.perf_counter()
        train_samples = self._experience(prompts, generated, scored)
        minibatches = partition_minibatches(self.w, lengths)
        orders = [[list(schedule.orders[r]) for _ in minibatches] for r in range(self.n)]
        for r, conn in enumerate(self.conns):
            conn.send(("train", train_samples, minibatches, orders[r]))
        busy = [0.0] * self.n
        busy_cpu = [0.0] * self.n
        for conn in self.conns:
            msg = conn.recv()
            assert msg[0] == "trained", msg
            busy[msg[1]] = msg[2]["busy_s"]
            busy_cpu[msg[1]] = msg[2]["busy_cpu_s"]
            self.last_train_stats[msg[1]] = msg[2]
        end = time.perf_counter()
        report = IterationReport(
            fused=fused,
            wall_s=end - start,
            gen_inference_s=gen_done - start,
            train_s=end - gen_done,
            busy_s=busy,
            busy_cpu_s=busy_cpu,
            batch_size=w.batch_size,
            migration_at_s=migration_at,
            events=events,
        )
        return report

    def _experience(
        self,
        prompts: torch.Tensor,
        generated: dict[int, tuple[list[int], list[float]]],
        scored: dict[int, tuple[list[float], list[float], float]],
    ) -> dict[int, TrainSample]:
        """KL-penalised rewards, GAE and whitened advantages for the whole batch (controller side)."""
        ids = sorted(generated)
        width = max(len(generated[i][0]) for i in ids)
        mask = torch.zeros(len(ids), width)
        logp, ref, values = torch.zeros_like(mask), torch.zeros_like(mask), torch.zeros_like(mask)
        for row, sid in enumerate(ids):
            n = len(generated[sid][0])
            mask[row, :n] = 1
            logp[row, :n] = torch.tensor(generated[sid][1])
            ref[row, :n] = torch.tensor(scored[sid][0])
            values[row, :n] = torch.tensor(scored[sid][1])
        scores = torch.tensor([scored[i][2] for i in ids])
        rewards, _ = kl_penalized_rewards(scores, logp, ref, mask, self.ppo.kl_coef)
        adv, ret = gae(rewards, values, mask, self.ppo.gamma, self.ppo.lam)
        adv = whiten(adv, mask)
        out = {}
        for row, sid in enumerate(ids):
            n = len(generated[sid][0])
            out[sid] = TrainSample(
                prompt=tuple(prompts[sid].tolist()),
                response=tuple(generated[sid][0]),
                old_logprobs=tuple(generated[sid][1]),
                advantages=tuple(adv[row, :n].tolist()),
                returns=tuple(ret[row, :n].tolist()),
                old_values=tuple(values[row, :n].tolist()),
            )
        return out


def partition_minibatches(w: FusionWorkload, lengths: Sequence[int]) -> list[list[list[int]]]:
    """Random (seeded) PPO mini-batches, each cut into length-balanced micro-batches."""
    order = list(range(w.batch_size))
    random.Random(w.seed + 1).shuffle(order)
    per_mb = w.batch_size // w.n_minibatches
    out = []
    for m in range(w.n_minibatches):
        members = order[m * per_mb : (m + 1) * per_mb]
        groups = balance_microbatches([w.prompt_len + lengths[i] for i in members], w.n_microbatches)
        out.append([[members[i] for i in g] for g in groups])
    return out
