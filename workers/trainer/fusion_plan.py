"""Offline planning for the fusion benchmark: micro-batching, stage profiling, schedule search, Rt.

RLHFuse plans offline from profiles: the fused training schedule comes from stage times measured
on a representative micro-batch, and Rt from simulating the inter-stage policy over the
output-length distribution with measured decode/inference costs. Both happen here, before the
measured iterations.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from core.rlhf.anneal import AnnealConfig, anneal_schedule
from core.rlhf.interstage import InterStageConfig, StageCosts, choose_rt
from core.rlhf.pipeline import (
    PipelineModel,
    PipelineProblem,
    sequential_schedule,
    simulate,
)
from workers.trainer.workload import FusionWorkload, partition_minibatches

__all__ = ["StageTimes", "build_problem", "plan_schedules", "profile_models", "profile_stage_times"]


def mean_microbatch_shape(w: FusionWorkload, lengths: Sequence[int]) -> tuple[int, int]:
    """(rows, padded length) of a micro-batch with the partition's mean padded token count."""
    groups = [g for mb in partition_minibatches(w, lengths) for g in mb]
    tokens = [len(g) * (w.prompt_len + max(lengths[i] for i in g)) for g in groups]
    rows = round(sum(len(g) for g in groups) / len(groups))
    return rows, max(1, round(sum(tokens) / len(tokens) / rows))


@dataclass(frozen=True)
class StageTimes:
    """Measured per-stage forward/backward seconds of each model's pipeline split."""

    actor_forward: tuple[float, ...]
    actor_backward: tuple[float, ...]
    critic_forward: tuple[float, ...]
    """Indexed by critic stage (stage 0 runs on the last node: the pipelines are reversed)."""
    critic_backward: tuple[float, ...]


def _profile_stages(stages: Sequence[torch.nn.Module], ids: torch.Tensor, repeats: int) -> tuple[list[float], ...]:
    """Median forward/backward seconds per stage; a frozen stage (no backward work) has backward 0."""
    from workers.trainer.pipeline import backward_flags

    flags = backward_flags(stages)
    fwd: list[list[float]] = [[] for _ in stages]
    bwd: list[list[float]] = [[] for _ in stages]
    for _ in range(repeats + 1):  # the first round warms up kernels and the allocator
        x = ids
        for s, stage in enumerate(stages):
            inp = x if s == 0 else x.detach().requires_grad_(s > 0 and flags[s - 1])
            t0 = time.perf_counter()
            with torch.set_grad_enabled(flags[s]):
                out = stage(inp)
            t1 = time.perf_counter()
            if flags[s]:
                out.float().square().mean().backward()
            t2 = time.perf_counter()
            fwd[s].append(t1 - t0)
            bwd[s].append(t2 - t1)
            x = out
    return tuple([statistics.median(v[1:]) for v in times] for times in (fwd, bwd))


def profile_models(
    models: Any,
    n_stages: int,
    rows: int,
    length: int,
    vocab_size: int,
    *,
    actor_cuts: Sequence[int] | None = None,
    critic_cuts: Sequence[int] | None = None,
    repeats: int = 5,
) -> StageTimes:
    """Median forward/backward seconds per pipeline stage of actor and critic on one micro-batch."""
    from workers.trainer.models import decoder_and_head
    from workers.trainer.pipeline import make_stages

    ids = torch.randint(3, vocab_size, (rows, length), generator=torch.Generator().manual_seed(0))
    decoder, head = decoder_and_head(models.actor)
    af, ab = _profile_stages(make_stages(decoder, head, n_stages, actor_cuts), ids, repeats)
    critic = models.critic
    cf, cb = _profile_stages(make_stages(critic.backbone, critic.value_head, n_stages, critic_cuts), ids, repeats)
    for model in (models.actor, critic):
        model.zero_grad(set_to_none=True)
    return StageTimes(tuple(af), tuple(ab), tuple(cf), tuple(cb))


def profile_stage_times(workload: FusionWorkload, lengths: Sequence[int], repeats: int = 5) -> StageTimes:
    """The benchmark's stage times: tiny models, a mean-cost micro-batch, 1 thread."""
    torch.set_num_threads(1)
    models = workload.spec().build()
    rows, length = mean_microbatch_shape(workload, lengths)
    return profile_models(models, 2, rows, length, workload.model["vocab_size"], repeats=repeats)


def build_problem(n_microbatches: int, times: StageTimes, unit_s: float = 1e-4) -> PipelineProblem:
    """Actor (stage s on node s) and critic (stage s on node n-1-s), integer times in ``unit_s`` units.

    Memory limit per node: the sum of both models' 1F1B peaks, i.e. fused training may hold as
    many activations as the two models would if each ran 1F1B on its own.
    """

    def ticks(values: Sequence[float]) -> tuple[int, ...]:
        return tuple(0 if t <= 0 else max(1, math.ceil(t / unit_s)) for t in values)

    n = len(times.actor_forward)
    m = n_microbatches
    actor = PipelineModel(
        "actor", m, ticks(times.actor_forward), ticks(times.actor_backward), tuple(range(n)), (1.0,) * n
    )
    critic = PipelineModel(
        "critic", m, ticks(times.critic_forward), ticks(times.critic_backward), tuple(reversed(range(n))), (1.0,) * n
    )
    peaks = []
    for model in (actor, critic):
        alone = PipelineProblem((model,), n)
        tl = simulate(alone, sequential_schedule(alone))
        assert tl is not None
        peaks.append(tl.peak_memory)
    limit = max(a + c for a, c in zip(*peaks, strict=True))
    return PipelineProblem((actor, critic), n, memory_limit=limit)


def plan_schedules(problem: PipelineProblem, anneal: AnnealConfig | None = None) -> dict[str, Any]:
    """Sequential 1F1B (unfused) and the annealed fused schedule, with their simulated makespans."""
    sequential = sequential_schedule(problem)
    result = anneal_schedule(problem, anneal or AnnealConfig())
    seq_tl = simulate(problem, sequential)
    assert seq_tl is not None
    return {
        "unfused": sequential,
        "fused": result.schedule,
        "sim_unfused": seq_tl.makespan,
        "sim_fused": result.timeline.makespan,
        "fused_peak_memory": max(result.timeline.peak_memory),
        "memory_limit": problem.memory_limit,
    }


@dataclass(frozen=True)
class LinearCost:
    """``fixed + per_unit * x`` seconds, fitted by least squares to measured points."""

    fixed: float
    per_unit: float

    def __call__(self, x: float) -> float:
        return self.fixed + self.per_unit * x

    @staticmethod
    def fit(xs: Sequence[float], ys: Sequence[float]) -> LinearCost:
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        var = sum((x - mx) ** 2 for x in xs)
        slope = 0.0 if var == 0 else sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var
        slope = max(slope, 0.0)
        return LinearCost(max(my - slope * mx, 0.0), slope)


def profile_generation_costs(workload: FusionWorkload, steps: int = 12) -> tuple[LinearCost, LinearCost]:
    """(decode step seconds vs batch size, inference micro-batch seconds vs tokens), 1 thread."""
    from workers.trainer.batch import Rollout, collate, gather_positions
    from workers.trainer.generation import DecodeBatch, sample_generators
    from workers.trainer.models import causal_lm_logits

    torch.set_num_threads(1)
    models = workload.spec().build()
    gen = torch.Generator().manual_seed(0)
    batches, step_s = [], []
    for b in (1, 4, 8, 16):
        prompts = torch.randint(3, workload.model["vocab_size"], (b, workload.prompt_len), generator=gen).tolist()
        decode = DecodeBatch(models.actor, list(range(b)), prompts, [steps + 40] * b, sample_generators(0, range(b)))
        for _ in range(3):
            decode.step()  # warm up
        t0 = time.perf_counter()
        for _ in range(steps):
            decode.step()
        batches.append(b)
        step_s.append((time.perf_counter() - t0) / steps)
    tokens, score_s = [], []
    assert models.reference is not None and models.reward is not None
    for length in (16, 48, 96):
        rollouts = [
            Rollout(str(i), tuple(range(3, 3 + workload.prompt_len)), tuple(range(3, 3 + length)), (0.0,) * length, "")
            for i in range(workload.inference_microbatch)
        ]
        with torch.no_grad():
            for repeat in range(3):
                t0 = time.perf_counter()
                batch = collate(rollouts, models.pad_token_id)
                causal_lm_logits(models.reference, batch.input_ids)
                gather_positions(models.critic(batch.input_ids), batch.response_positions)
                models.reward.score(batch.input_ids, batch.lengths)
                if repeat:
                    tokens.append(float(batch.lengths.sum()))
                    score_s.append(time.perf_counter() - t0)
    return LinearCost.fit(batches, step_s), LinearCost.fit(tokens, score_s)


def simulated_rt_sweep(
    workload: FusionWorkload,
    decode: LinearCost,
    inference: LinearCost,
    candidates: Sequence[float] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5),
    batches: int = 8,
) -> tuple[float, dict[float, float]]:
    """RLHFuse's offline Rt choice: simulate the policy over batches drawn from the length law."""
    from workers.trainer.workload import sample_lengths

    samples = [sample_lengths(FusionWorkload(**{**vars(workload), "seed": workload.seed + k})) for k in range(batches)]
    costs = StageCosts(decode_step=decode, inference=lambda n, t: inference(t))
    base = InterStageConfig(
        max_batch_per_instance=workload.batch_size, inference_microbatch=workload.inference_microbatch
    )
    return choose_rt(samples, 2, costs, candidates=candidates, base=base, prompt_tokens=workload.prompt_len)


def simulated_gen_inference(
    workload: FusionWorkload, lengths: Sequence[int], decode: LinearCost, inference: LinearCost
) -> tuple[float, float]:
    """Simulated (unfused, fused at ``workload.rt``) generation+inference seconds for ``lengths``."""
    from core.rlhf.interstage import round_robin, simulate_generation_and_inference

    costs = StageCosts(decode_step=decode, inference=lambda n, t: inference(t))
    out = []
    for fused in (False, True):
        cfg = InterStageConfig(
            rt=workload.rt,
            fused=fused,
            max_batch_per_instance=workload.batch_size,
            inference_microbatch=workload.inference_microbatch,
        )
        out.append(
            simulate_generation_and_inference(
                lengths, round_robin(len(lengths), 2), 2, cfg, costs, prompt_tokens=workload.prompt_len
            ).makespan
        )
    return out[0], out[1]
