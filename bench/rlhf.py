"""``flywheel bench rlhf``: one PPO iteration, RLHFuse-fused vs the best unfused schedule, on CPU.

Two rank processes (each pinned to one core, one torch thread) stand in for two GPU instances;
tiny Llama actor/reference/critic/reward models; prompts of 16 tokens; response lengths forced
from a clipped lognormal (long tail), so every variant does exactly the same work. Variants,
side by side on the same weights and the same samples (per-sample samplers, forced lengths):

- ``unfused_pp``: generation, a barrier, inference; actor then critic trained with 1F1B over the
  2-stage pipeline (RLHFuse's unfused baseline);
- ``unfused_dp``: the same generation and inference; actor and critic trained data-parallel
  (each rank the full models on half of every mini-batch, gradients all-reduced): no bubbles,
  but every rank holds both full models and their optimiser state;
- ``fused``: inter-stage fusion (the tail migrates at ``rt``, free ranks score finished samples)
  and the annealed fused actor+critic pipeline schedule (opposite directions fill each other's
  bubbles);
- ``fused_dp`` (reported, not a baseline): inter-stage fusion with data-parallel training.

``ratio`` = fused samples/s over the best unfused variant's, the median over back-to-back rounds
(robust to load spikes on a shared machine), per seed; the headline is the mean over seeds with
min/max. ``agreement`` checks, once per run, that every schedule makes the same update from the
same rollouts (max abs difference of the trained tensors; SGD so it compares gradients).
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import time
from typing import Any

from core.rlhf.anneal import AnnealConfig
from core.rlhf.pipeline import lower_bound

VARIANTS = ("unfused_pp", "unfused_dp", "fused", "fused_dp")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-size", type=int, default=32, help="prompts per PPO iteration")
    parser.add_argument("--minibatches", type=int, default=2, help="PPO mini-batches per iteration")
    parser.add_argument("--microbatches", type=int, default=2,
                        help="pipeline micro-batches per mini-batch (bubble share (N-1)/(N-1+M))")
    parser.add_argument("--max-len", type=int, default=256, help="longest response (the tail)")
    parser.add_argument("--length-sigma", type=float, default=0.9, help="log-space spread of response lengths")
    parser.add_argument("--rt", type=str, default="0.2",
                        help="migration threshold (share unfinished), or 'auto' for the simulated optimum")
    parser.add_argument("--repeats", type=int, default=5, help="measured rounds of all variants per seed")
    parser.add_argument("--seeds", type=str, default="0,1,2")
    parser.add_argument("--anneal-iterations", type=int, default=20_000, help="annealing moves per restart")
    parser.add_argument("--no-pin", action="store_true", help="do not pin ranks to CPU cores")
    parser.add_argument("--quick", action="store_true", help="small batch, 1 seed, 1 round (smoke test)")
    parser.add_argument("--live", action="store_true",
                        help="measure the live trainer's own iteration on SmolLM2 instead (bench/rlhf_live.py)")
    parser.add_argument("--live-batch", type=int, default=8, help="--live: rewarded rollouts per iteration")
    parser.add_argument("--live-generate", type=int, default=4, help="--live: live prompts answered per iteration")
    parser.add_argument("--live-max-new-tokens", type=int, default=48)
    parser.add_argument("--live-repeats", type=int, default=3)


def _summary(reports: list[Any]) -> dict[str, Any]:
    med = statistics.median
    return {
        "samples_per_s": med([r.samples_per_s for r in reports]),
        "idle_fraction": med([r.idle_fraction for r in reports]),
        "wall_s": med([r.wall_s for r in reports]),
        "gen_inference_s": med([r.gen_inference_s for r in reports]),
        "train_s": med([r.train_s for r in reports]),
        "busy_wall_s": med([sum(r.busy_s) for r in reports]),
        "busy_cpu_s": med([sum(r.busy_cpu_s) for r in reports]),
    }


def _workload(args: argparse.Namespace, seed: int) -> Any:
    from workers.trainer.workload import FusionWorkload

    if args.quick:
        return FusionWorkload(batch_size=8, max_len=48, n_minibatches=1, n_microbatches=2, seed=seed)
    return FusionWorkload(batch_size=args.batch_size, max_len=args.max_len, length_sigma=args.length_sigma,
                          n_minibatches=args.minibatches, n_microbatches=args.microbatches, seed=seed)


def _plan(args: argparse.Namespace, workload: Any, lengths: list[int]) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """Offline, as RLHFuse plans: stage and generation profiles, the schedule search, Rt."""
    from workers.trainer.fusion_plan import (
        build_problem,
        plan_schedules,
        profile_generation_costs,
        profile_stage_times,
        simulated_gen_inference,
        simulated_rt_sweep,
    )

    t0 = time.perf_counter()
    times = profile_stage_times(workload, lengths)
    problem = build_problem(workload.n_microbatches, times)
    anneal = AnnealConfig(iterations=2000 if args.quick else args.anneal_iterations,
                          memory_iterations=200 if args.quick else 2000, seed=workload.seed)
    plans = plan_schedules(problem, anneal)
    decode, inference = profile_generation_costs(workload)
    best_rt, sweep = simulated_rt_sweep(workload, decode, inference)
    rt = best_rt if args.rt == "auto" else float(args.rt)
    from workers.trainer.workload import FusionWorkload

    workload = FusionWorkload(**{**vars(workload), "rt": rt})
    gen_unfused, gen_fused = simulated_gen_inference(workload, lengths, decode, inference)
    unit_s = 1e-4  # build_problem's time unit
    # Data parallel with no bubbles and a free all-reduce: each rank trains half the micro-batches
    # through every stage of both models (an optimistic bound for the DP baseline).
    per_microbatch = sum(sum(v) for v in vars(times).values())
    train_dp = workload.n_minibatches * workload.n_microbatches / 2 * per_microbatch
    train_pp, train_fused = (plans[k] * unit_s * workload.n_minibatches for k in ("sim_unfused", "sim_fused"))
    model = {
        "note": "from 1-thread stage and decode profiles: what a dedicated core per rank should show",
        "gen_inference_s": {"unfused": round(gen_unfused, 4), "fused": round(gen_fused, 4)},
        "train_s": {"unfused_pp": round(train_pp, 4), "unfused_dp": round(train_dp, 4), "fused": round(train_fused, 4)},
        "ratio_vs_unfused_pp": (gen_unfused + train_pp) / (gen_fused + train_fused),
        "ratio_vs_unfused_dp": (gen_unfused + train_dp) / (gen_fused + train_fused),
        "rt_sweep_s": {f"{k:g}": round(v, 4) for k, v in sweep.items()},
        "best_rt": best_rt,
    }
    schedule = {
        "sim_unfused_makespan": plans["sim_unfused"],
        "sim_fused_makespan": plans["sim_fused"],
        "lower_bound": lower_bound(problem),
        "sim_ratio": plans["sim_unfused"] / plans["sim_fused"],
        "fused_peak_activations": plans["fused_peak_memory"],
        "memory_limit": plans["memory_limit"],
        "stage_times_s": {k: [round(x, 5) for x in v] for k, v in vars(times).items()},
        "planning_s": round(time.perf_counter() - t0, 2),
    }
    return workload, plans, {"schedule": schedule, "cost_model": model}


def _memory(workload: Any) -> dict[str, float]:
    """Model-state MB per rank (fp32 weights + gradients + AdamW moments of the trained models)."""
    m = workload.model
    h, i, v, n = m["hidden_size"], m["intermediate_size"], m["vocab_size"], m["num_layers"]
    kv = h // m["num_heads"] * m["num_kv_heads"]
    layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    actor = v * h * 2 + n * layer
    critic = v * h + n * layer + h
    train_bytes = 4 * 4 * (actor + critic)  # weights, grads, two Adam moments
    return {"pipeline_mb": round(train_bytes / 2 / 2**20, 2), "data_parallel_mb": round(train_bytes / 2**20, 2)}


def _agreement(workload: Any, plans: dict[str, Any], pin: bool) -> dict[str, float]:
    """Max |difference| of the trained tensors between schedules, from the same rollouts (SGD)."""
    import tempfile
    from pathlib import Path

    from workers.trainer.checkpoint import CheckpointMeta, read_trainable_state, trainable_state
    from workers.trainer.fusion import FusionCluster, GivenSample, IterationPlan
    from workers.trainer.generation import DecodeBatch, sample_generators

    models = workload.spec().build()
    initial = trainable_state(models.actor, models.critic)
    prompts = workload.prompts()[:8]
    batch = DecodeBatch(models.actor, list(range(8)), prompts, [12] * 8, sample_generators(workload.seed, range(8)))
    while len(batch):
        batch.step()
    given = tuple(GivenSample(i, prompts[i], tuple(batch.finished[i][0]), tuple(batch.finished[i][1]),
                              1.0 if i % 2 else -1.0) for i in range(8))
    states = {}
    with tempfile.TemporaryDirectory() as tmp, FusionCluster(
        workload.spec(), 2, optimizer="sgd", actor_lr=0.1, critic_lr=0.1, pin=pin
    ) as cluster:
        for name, fused, schedule in (("unfused_pp", False, plans["unfused"]), ("fused", True, plans["fused"]),
                                      ("unfused_dp", False, None)):
            cluster.reset()
            cluster.run_iteration(IterationPlan(given=given, fused=fused, n_minibatches=1,
                                                n_microbatches=workload.n_microbatches, schedule=schedule))
            _, path = cluster.export(Path(tmp) / name, CheckpointMeta("tiny-llama", "v1", 1))
            state = read_trainable_state(path)
            assert state is not None
            states[name] = state
    base = states["unfused_pp"]
    update = max(float((base[k] - initial[k]).abs().max()) for k in base)
    out = {"max_update": update}
    for name in ("fused", "unfused_dp"):
        out[f"{name}_vs_unfused_pp"] = max(float((states[name][k] - base[k]).abs().max()) for k in base)
    out["tolerance"] = 1e-5
    out["agree"] = float(all(v <= 1e-5 for k, v in out.items() if k.endswith("_vs_unfused_pp")))
    return out


def run_seed(args: argparse.Namespace, seed: int) -> dict[str, Any]:
    from workers.trainer.fusion import FusionCluster
    from workers.trainer.workload import sample_lengths

    workload = _workload(args, seed)
    lengths = sample_lengths(workload)
    workload, plans, planned = _plan(args, workload, lengths)
    repeats = 1 if args.quick else args.repeats
    runs: dict[str, list[Any]] = {v: [] for v in VARIANTS}
    plan_of = {
        "unfused_pp": workload.plan(lengths, False, plans["unfused"]),
        "unfused_dp": workload.plan(lengths, False, None),
        "fused": workload.plan(lengths, True, plans["fused"]),
        "fused_dp": workload.plan(lengths, True, None),
    }
    with FusionCluster(workload.spec(), 2, actor_lr=workload.lr, critic_lr=workload.lr, pin=not args.no_pin) as cluster:
        for variant in VARIANTS:  # warm-up: allocator, first-call paths
            cluster.reset()
            cluster.run_iteration(plan_of[variant])
        for _ in range(repeats):
            for variant in VARIANTS:
                cluster.reset()
                runs[variant].append(cluster.run_iteration(plan_of[variant]))
    summary = {v: _summary(r) for v, r in runs.items()}
    rounds = []
    for i in range(repeats):
        walls = {v: runs[v][i].wall_s for v in VARIANTS}
        rounds.append({"vs_best_unfused": min(walls["unfused_pp"], walls["unfused_dp"]) / walls["fused"],
                       "vs_unfused_pp": walls["unfused_pp"] / walls["fused"],
                       "vs_unfused_dp": walls["unfused_dp"] / walls["fused"]})
    ratios = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    best = min(("unfused_pp", "unfused_dp"), key=lambda v: summary[v]["wall_s"])
    return {
        "seed": seed,
        "variants": summary,
        "best_unfused": best,
        "ratio": ratios["vs_best_unfused"],
        "ratio_vs_unfused_pp": ratios["vs_unfused_pp"],
        "ratio_vs_unfused_dp": ratios["vs_unfused_dp"],
        "ratio_per_round": [round(r["vs_best_unfused"], 3) for r in rounds],
        "ratio_gen_inference": summary["unfused_pp"]["gen_inference_s"] / summary["fused"]["gen_inference_s"],
        "ratio_train_vs_pp": summary["unfused_pp"]["train_s"] / summary["fused"]["train_s"],
        "ratio_train_vs_dp": summary["unfused_dp"]["train_s"] / summary["fused"]["train_s"],
        "cpu_share": round(summary["fused"]["busy_cpu_s"] / summary["fused"]["busy_wall_s"], 3),
        "lengths_min_median_max": [min(lengths), int(statistics.median(lengths)), max(lengths)],
        "rt": workload.rt,
        **planned,
        "_workload": workload,
        "_plans": plans,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.live:
        from bench.rlhf_live import run_live

        return run_live(args)
    seeds = [0] if args.quick else [int(s) for s in args.seeds.split(",") if s.strip()]
    per_seed = [run_seed(args, seed) for seed in seeds]
    agreement = _agreement(per_seed[0]["_workload"], per_seed[0]["_plans"], pin=not args.no_pin)
    workload = per_seed[0]["_workload"]
    for r in per_seed:
        del r["_workload"], r["_plans"]
    ratios = [r["ratio"] for r in per_seed]
    return {
        "ratio": statistics.fmean(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "ratio_per_seed": [round(x, 3) for x in ratios],
        "ratio_vs_unfused_pp": statistics.fmean(r["ratio_vs_unfused_pp"] for r in per_seed),
        "ratio_vs_unfused_dp": statistics.fmean(r["ratio_vs_unfused_dp"] for r in per_seed),
        "target_ratio": 1.3,
        "cost_model_ratio_vs_unfused_pp": statistics.fmean(r["cost_model"]["ratio_vs_unfused_pp"] for r in per_seed),
        "cost_model_ratio_vs_unfused_dp": statistics.fmean(r["cost_model"]["ratio_vs_unfused_dp"] for r in per_seed),
        "cpu_share": statistics.fmean(r["cpu_share"] for r in per_seed),
        "agreement": agreement,
        "memory_per_rank": _memory(workload),
        "seeds": per_seed,
        "config": {
            "batch_size": workload.batch_size,
            "rt": args.rt,
            "repeats": 1 if args.quick else args.repeats,
            "ranks": 2,
            "pipeline_depth": 2,
            "prompt_len": workload.prompt_len,
            "max_len": workload.max_len,
            "length_sigma": workload.length_sigma,
            "model": workload.model,
            "minibatches": workload.n_minibatches,
            "microbatches": workload.n_microbatches,
            "bubble_share_1f1b": 1 / (1 + workload.n_microbatches),
            "inference_microbatch": workload.inference_microbatch,
            "pinned": not args.no_pin,
            "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "date": datetime.date.today().isoformat(),
        },
    }
