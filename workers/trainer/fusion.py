"""Controller of the fused PPO runtime: one iteration over rank processes, fused (RLHFuse) or not.

One iteration (``FusionCluster.run_iteration(IterationPlan)``):

1. **Generation + inference.** New samples are generated from prompts (round robin over the
   ranks) while finished samples, and the *given* ones (rollouts generated earlier, e.g. served
   by workers and since rewarded), get their reference log-probs and critic values (and, in the
   benchmark, the reward network's score). ``core.rlhf.interstage.InterStageScheduler`` decides:
   fused, the generation tail migrates to fewer ranks at ``rt`` and every free rank scores
   finished samples at once; unfused, inference waits for the last sample (a barrier).
2. **Experience** (here, on the controller): KL-penalised rewards from the *behaviour* log-probs
   (the PPO "old" log-probs, see ``core.rlhf.buffer``), GAE, advantages whitened over the batch.
3. **Training.** PPO mini-batches of length-balanced micro-batches, either through a pipeline
   schedule (actor stage r on rank r, critic reversed; the annealed fused schedule or sequential
   1F1B) or data-parallel (``schedule=None``), then the trained tensors are re-synced.

The live trainer trains on the given samples and publishes the generated ones as rollouts for
later (they need rewards first); the benchmark trains on what it generated (RLHFuse's
synchronous iteration). Throughput is samples per second of the whole iteration; the idle
fraction is idle rank-time over total rank-time (ranks count their own compute seconds).
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

from core.rlhf.interstage import InterStageConfig, InterStageScheduler
from core.rlhf.pipeline import Schedule, balance_microbatches
from core.rlhf.ppo import PPOConfig, gae, kl_penalized_rewards, whiten
from workers.trainer.checkpoint import CheckpointMeta
from workers.trainer.fusion_worker import ScoreRequest, TrainSample, WorkerSpec, worker_main
from workers.trainer.models import ModelSpec


@dataclass(frozen=True)
class GenerateItem:
    """A prompt to sample a response for (``target``: forced length, or the maximum with EOS)."""

    sid: int
    prompt: tuple[int, ...]
    target: int


@dataclass(frozen=True)
class GivenSample:
    """A sample generated before this iteration (a rewarded rollout)."""

    sid: int
    prompt: tuple[int, ...]
    response: tuple[int, ...]
    behaviour_logprobs: tuple[float, ...]
    reward: float
    ref_logprobs: tuple[float, ...] | None = None
    """Known already (computed while it was generated here): inference skips the reference."""


@dataclass(frozen=True)
class IterationPlan:
    generate: tuple[GenerateItem, ...] = ()
    given: tuple[GivenSample, ...] = ()
    train_generated: bool = False
    """True (benchmark): train on the generated samples, scored by the reward network."""
    fused: bool = True
    rt: float = 0.2
    inference_microbatch: int = 4
    max_batch_per_instance: int = 64
    eos_ids: frozenset[int] | None = None
    """End tokens for generation (None: ``target`` is a forced length)."""
    seed: int = 0
    n_minibatches: int = 1
    n_microbatches: int = 2
    epochs: int = 1
    schedule: Schedule | None = None
    """Per-rank task lists of one flush; None trains data-parallel."""


@dataclass
class IterationReport:
    fused: bool
    wall_s: float
    gen_inference_s: float
    train_s: float
    busy_s: list[float]
    """Per-rank compute seconds (wall clock)."""
    busy_cpu_s: list[float]
    """Per-rank compute seconds (thread CPU time): well below ``busy_s`` on a contended machine."""
    batch_size: int
    migration_at_s: float | None = None
    events: list[tuple[float, str, int, int]] = field(default_factory=list)
    """Controller-side log: (seconds since start, kind, rank, samples) for finished / score /
    scored / migrate."""
    generated: dict[int, tuple[list[int], list[float], list[float]]] = field(default_factory=dict)
    """Generated sample id -> (tokens, behaviour log-probs, reference log-probs)."""
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def samples_per_s(self) -> float:
        return 0.0 if self.wall_s == 0 else self.batch_size / self.wall_s

    @property
    def idle_fraction(self) -> float:
        total = self.wall_s * len(self.busy_s)
        return 0.0 if total == 0 else max(0.0, 1.0 - sum(self.busy_s) / total)


def partition(
    lengths: dict[int, int], n_minibatches: int, n_microbatches: int, seed: int
) -> list[list[list[int]]]:
    """Seeded random PPO mini-batches, each cut into length-balanced micro-batches (sample ids)."""
    ids = sorted(lengths)
    random.Random(seed).shuffle(ids)
    if not 1 <= n_minibatches <= len(ids):
        raise ValueError(f"cannot cut {len(ids)} samples into {n_minibatches} mini-batches")
    out = []
    for m in range(n_minibatches):
        members = ids[m::n_minibatches]
        micro = min(n_microbatches, len(members))
        groups = balance_microbatches([lengths[i] for i in members], micro)
        out.append([[members[i] for i in g] for g in groups])
    return out


ScoredSample = tuple[tuple[int, ...], tuple[int, ...], Sequence[float], Sequence[float], Sequence[float], float]
"""(prompt, response, behaviour log-probs, reference log-probs, values, score)."""


def experience(
    samples: dict[int, ScoredSample],
    ppo: PPOConfig,
) -> tuple[dict[int, TrainSample], dict[str, float]]:
    """PPO targets for ``sid -> (prompt, response, behaviour logp, ref logp, values, score)``.

    Advantages are whitened over the whole batch (every sample of the iteration is here)."""
    ids = sorted(samples)
    width = max(len(samples[i][1]) for i in ids)
    mask = torch.zeros(len(ids), width)
    logp, ref, values = torch.zeros_like(mask), torch.zeros_like(mask), torch.zeros_like(mask)
    for row, sid in enumerate(ids):
        _, response, behaviour, reference, vals, _ = samples[sid]
        n = len(response)
        mask[row, :n] = 1
        logp[row, :n] = torch.tensor(list(behaviour))
        ref[row, :n] = torch.tensor(list(reference))
        values[row, :n] = torch.tensor(list(vals))
    scores = torch.tensor([samples[i][5] for i in ids])
    rewards, kl = kl_penalized_rewards(scores, logp, ref, mask, ppo.kl_coef, score_clip=ppo.score_clip)
    adv, ret = gae(rewards, values, mask, ppo.gamma, ppo.lam)
    if ppo.whiten_advantages and mask.sum() >= 2:
        adv = whiten(adv, mask)
    out = {}
    for row, sid in enumerate(ids):
        prompt, response, behaviour, _, _, _ = samples[sid]
        n = len(response)
        out[sid] = TrainSample(
            prompt=prompt,
            response=response,
            old_logprobs=tuple(float(x) for x in behaviour),
            advantages=tuple(adv[row, :n].tolist()),
            returns=tuple(ret[row, :n].tolist()),
            old_values=tuple(values[row, :n].tolist()),
        )
    tokens = float(mask.sum())
    return out, {"score_mean": float(scores.mean()), "kl_mean": float(kl.sum() / tokens), "response_tokens": tokens}


class FusionCluster:
    """Rank processes plus the controller side of the protocol. Use as a context manager."""

    def __init__(
        self,
        models: ModelSpec,
        n_workers: int = 2,
        *,
        ppo: PPOConfig | None = None,
        actor_lr: float = 1e-4,
        critic_lr: float = 1e-4,
        max_grad_norm: float | None = 1.0,
        optimizer: str = "adamw",
        actor_cuts: tuple[int, ...] | None = None,
        critic_cuts: tuple[int, ...] | None = None,
        threads: int = 1,
        pin: bool = True,
        start_method: str = "spawn",
    ) -> None:
        """``start_method``: "spawn" (clean ranks, the default) or "fork" (fast start, for tests)."""
        self.n = n_workers
        self.ppo = ppo or PPOConfig()
        self._tmp = tempfile.TemporaryDirectory(prefix="flywheel-fusion-")
        ctx = mp.get_context(start_method)
        pipes = [ctx.Pipe() for _ in range(n_workers)]
        self.conns = [a for a, _ in pipes]
        spec = WorkerSpec(
            world=n_workers,
            init_method=f"file://{Path(self._tmp.name) / 'init'}",
            conns=[b for _, b in pipes],
            models=models,
            ppo=self.ppo,
            actor_lr=actor_lr,
            critic_lr=critic_lr,
            max_grad_norm=max_grad_norm,
            optimizer=optimizer,
            actor_cuts=actor_cuts,
            critic_cuts=critic_cuts,
            threads=threads,
            pin=pin,
        )
        self.procs = mp.start_processes(
            worker_main, args=(spec,), nprocs=n_workers, join=False, start_method=start_method
        )
        try:
            for conn in self.conns:
                self._expect(conn, "ready")
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> FusionCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for conn in self.conns:
            with contextlib.suppress(BrokenPipeError, OSError):
                conn.send(("stop",))
        with contextlib.suppress(Exception):
            self.procs.join(60)
        for proc in getattr(self.procs, "processes", []):
            if proc.is_alive():
                proc.kill()
        self._tmp.cleanup()

    @staticmethod
    def _recv(conn: Connection) -> Any:
        try:
            return conn.recv()
        except EOFError as exc:
            raise RuntimeError("a trainer rank died (see its traceback above)") from exc

    def _expect(self, conn: Connection, kind: str) -> Any:
        msg = self._recv(conn)
        if msg[0] != kind:
            raise RuntimeError(f"expected {kind!r} from a rank, got {msg[0]!r}")
        return msg

    def _all(self, command: tuple[Any, ...], reply: str) -> list[Any]:
        for conn in self.conns:
            conn.send(command)
        return [self._expect(conn, reply) for conn in self.conns]

    def digests(self) -> list[str]:
        """Each rank's digest of its trainable tensors (equal after every iteration's re-sync)."""
        return [msg[2] for msg in self._all(("digest",), "digest")]

    def reset(self) -> None:
        """Back to the initial trainable tensors and fresh optimisers (benchmark variants)."""
        self._all(("reset",), "ok")

    def load(self, path: Path) -> None:
        """Every rank resumes from a published checkpoint."""
        self._all(("load", str(path)), "ok")

    def profile(self, rows: int, length: int, vocab_size: int) -> Any:
        """Rank 0 times every pipeline stage of both models on one micro-batch (``StageTimes``)."""
        self.conns[0].send(("profile", rows, length, vocab_size))
        return self._expect(self.conns[0], "profiled")[2]

    def export(self, store_root: Path, meta: CheckpointMeta) -> tuple[str, Path]:
        """Rank 0 stores the current policy; returns (digest, directory)."""
        self.conns[0].send(("export", str(store_root), meta))
        msg = self._expect(self.conns[0], "exported")
        return str(msg[2]), Path(msg[3])

    # ------------------------------------------------------------------ one iteration

    def run_iteration(self, plan: IterationPlan) -> IterationReport:
        given = {g.sid: g for g in plan.given}
        if set(given) & {g.sid for g in plan.generate}:
            raise ValueError("a sample id is both given and generated")
        assignment = {item.sid: r % self.n for r, item in enumerate(plan.generate)}
        cfg = InterStageConfig(
            rt=plan.rt,
            fused=plan.fused,
            max_batch_per_instance=plan.max_batch_per_instance,
            inference_microbatch=plan.inference_microbatch,
        )
        sched = InterStageScheduler(assignment, self.n, cfg, finished=sorted(given))
        prompts = {item.sid: item.prompt for item in plan.generate} | {g.sid: g.prompt for g in plan.given}
        generated: dict[int, tuple[list[int], list[float]]] = {}
        scored: dict[int, dict[str, Any]] = {}
        start = time.perf_counter()
        migration_at: float | None = None
        events: list[tuple[float, str, int, int]] = []
        for r, conn in enumerate(self.conns):
            items = [(it.sid, it.prompt, it.target) for it in plan.generate if assignment[it.sid] == r]
            if items:
                conn.send(("generate", items, plan.seed, plan.eos_ids))

        def request(sid: int) -> ScoreRequest:
            if sid in given:
                g = given[sid]
                return ScoreRequest(g.prompt, g.response, ref=g.ref_logprobs is None, values=True)
            train = plan.train_generated
            return ScoreRequest(prompts[sid], tuple(generated[sid][0]), ref=True, values=train, reward=train)

        self._dispatch(sched, plan, request, start, events)  # work before any message (given only)
        while not sched.done:
            for ready in mpc.wait(self.conns):
                msg: Any = self._recv(cast(Connection, ready))  # wait() returns the Connections it was given
                now = time.perf_counter() - start
                if msg[0] == "finished":
                    for sid, toks, lps in msg[2]:
                        generated[sid] = (toks, lps)
                    sched.update(finished=[sid for sid, _, _ in msg[2]])
                    events.append((now, "finished", msg[1], len(msg[2])))
                elif msg[0] == "scored":
                    _, rank, ids, results = msg
                    events.append((now, "scored", rank, len(ids)))
                    for sid, result in zip(ids, results, strict=True):
                        scored[sid] = result
                    sched.update(scored=[(rank, ids)])
            moved = self._dispatch(sched, plan, request, start, events)
            migration_at = moved if moved is not None else migration_at
        gen_done = time.perf_counter()
        train_set = self._train_set(plan, given, generated, scored)
        out_generated = {
            sid: (toks, lps, list(scored.get(sid, {}).get("ref", []))) for sid, (toks, lps) in generated.items()
        }
        if not train_set:  # generation (and inference) only
            return IterationReport(fused=plan.fused, wall_s=gen_done - start, gen_inference_s=gen_done - start,
                                   train_s=0.0, busy_s=[], busy_cpu_s=[], batch_size=0, migration_at_s=migration_at,
                                   events=events, generated=out_generated)
        samples, exp_stats = experience(train_set, self.ppo)
        lengths = {sid: len(s.prompt) + len(s.response) for sid, s in samples.items()}
        flushes = [
            mb
            for epoch in range(plan.epochs)
            for mb in partition(lengths, plan.n_minibatches, plan.n_microbatches, plan.seed * 1009 + epoch + 1)
        ]
        if plan.schedule is None:
            for conn in self.conns:
                conn.send(("train_dp", samples, flushes))
        else:
            for r, conn in enumerate(self.conns):
                conn.send(("train", samples, flushes, [list(plan.schedule.orders[r]) for _ in flushes]))
        reports = sorted((self._expect(conn, "trained") for conn in self.conns), key=lambda m: m[1])
        end = time.perf_counter()
        stats = [m[2] for m in reports]
        tokens = sum(s["policy_tokens"] for s in stats) or 1.0
        metrics = {
            **exp_stats,
            "policy_loss": sum(s["policy_loss_sum"] for s in stats) / len(flushes),
            "value_loss": sum(s["value_loss_sum"] for s in stats) / len(flushes),
            "clipfrac": sum(s["clipfrac_tokens"] for s in stats) / tokens,
            "approx_kl": sum(s["approx_kl_tokens"] for s in stats) / tokens,
        }
        return IterationReport(
            fused=plan.fused,
            wall_s=end - start,
            gen_inference_s=gen_done - start,
            train_s=end - gen_done,
            busy_s=[s["busy_s"] for s in stats],
            busy_cpu_s=[s["busy_cpu_s"] for s in stats],
            batch_size=len(samples),
            migration_at_s=migration_at,
            events=events,
            generated=out_generated,
            metrics=metrics,
        )

    def _dispatch(
        self,
        sched: InterStageScheduler,
        plan: IterationPlan,
        request: Any,
        start: float,
        events: list[tuple[float, str, int, int]],
    ) -> float | None:
        """Send the scheduler's next migrations and inference tasks; returns the migration time."""
        migrated_at = None
        step = sched.schedule()
        for move in step.migrations:
            migrated_at = time.perf_counter() - start
            events.append((migrated_at, "migrate", move.source, len(move.sample_ids)))
            self.conns[move.source].send(("migrate_out", move.target))
            self.conns[move.target].send(("migrate_in", move.source, plan.eos_ids))
        for task in step.inference:
            requests = [request(s) for s in task.sample_ids]
            self.conns[task.instance].send(("score", list(task.sample_ids), requests))
            events.append((time.perf_counter() - start, "score", task.instance, len(task.sample_ids)))
        return migrated_at

    @staticmethod
    def _train_set(
        plan: IterationPlan,
        given: dict[int, GivenSample],
        generated: dict[int, tuple[list[int], list[float]]],
        scored: dict[int, dict[str, Any]],
    ) -> dict[int, ScoredSample]:
        out: dict[int, Any] = {}
        for sid, g in given.items():
            ref = g.ref_logprobs if g.ref_logprobs is not None else scored[sid]["ref"]
            out[sid] = (g.prompt, g.response, g.behaviour_logprobs, ref, scored[sid]["values"], g.reward)
        if plan.train_generated:
            prompts = {item.sid: item.prompt for item in plan.generate}
            for sid, (toks, lps) in generated.items():
                s = scored[sid]
                out[sid] = (prompts[sid], tuple(toks), lps, s["ref"], s["values"], s["reward"])
        return out
