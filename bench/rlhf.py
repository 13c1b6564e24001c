"""``flywheel bench rlhf``: one PPO iteration, RLHFuse-fused vs unfused, real execution on CPU.

Two worker processes (each pinned to one core, one torch thread) stand in for two GPU instances;
tiny Llama actor/reference/critic/reward models; prompts of 16 tokens; response lengths forced
from a clipped lognormal over 8..128 tokens (median ~30), so both variants do exactly the same
work. See ``workers.trainer.fusion`` for what each variant does.

- ``samples_per_s``: batch size / iteration wall time (generation + inference + training + the
  weight re-sync), median over ``--repeats`` alternating runs after one warm-up run of each.
- ``idle_fraction``: idle worker-time / total worker-time (workers time their own compute).
- ``ratio``: fused / unfused samples per second, the median over back-to-back pairs (target >= 1.3;
  RLHFuse reports 1.2-1.4x over its unfused version).

The fused training schedule is searched once, offline, from stage times profiled on a
mean-cost micro-batch; its simulated makespans and the lower bound are reported alongside.
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-size", type=int, default=32, help="prompts per PPO iteration")
    parser.add_argument(
        "--rt",
        type=str,
        default="0.2",
        help="migration threshold (share unfinished), or 'auto' for the simulated optimum",
    )
    parser.add_argument("--repeats", type=int, default=9, help="measured (unfused, fused) pairs")
    parser.add_argument("--anneal-iterations", type=int, default=20_000, help="annealing moves per restart")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-pin", action="store_true", help="do not pin workers to CPU cores")
    parser.add_argument("--quick", action="store_true", help="small batch, 1 repeat (smoke test)")
    parser.add_argument(
        "--rt-sweep",
        type=str,
        default="",
        help="comma-separated Rt values to also run fused (one run each), e.g. 0.1,0.2,0.3,0.4",
    )


def _summary(reports: list[Any]) -> dict[str, Any]:
    def med(values: list[float]) -> float:
        return statistics.median(values)

    return {
        "samples_per_s": med([r.samples_per_s for r in reports]),
        "idle_fraction": med([r.idle_fraction for r in reports]),
        "wall_s": med([r.wall_s for r in reports]),
        "gen_inference_s": med([r.gen_inference_s for r in reports]),
        "train_s": med([r.train_s for r in reports]),
        "busy_wall_s": med([sum(r.busy_s) for r in reports]),
        "busy_cpu_s": med([sum(r.busy_cpu_s) for r in reports]),
        "wall_s_all": [round(r.wall_s, 4) for r in reports],
    }


def _plan(args: argparse.Namespace) -> tuple[Any, list[int], dict[str, Any], dict[str, Any]]:
    """Offline: stage and generation cost profiles, the schedule search, Rt, and the cost model."""
    from workers.trainer.fusion import FusionWorkload, sample_lengths
    from workers.trainer.fusion_plan import (
        build_problem,
        plan_schedules,
        profile_generation_costs,
        profile_stage_times,
        simulated_gen_inference,
        simulated_rt_sweep,
    )

    quick = bool(args.quick)
    workload = FusionWorkload(
        batch_size=16 if quick else args.batch_size, seed=args.seed, n_minibatches=2, n_microbatches=2 if quick else 4
    )
    lengths = sample_lengths(workload)
    t0 = time.perf_counter()
    times = profile_stage_times(workload, lengths)
    problem = build_problem(workload, times)
    anneal = AnnealConfig(
        iterations=2000 if quick else args.anneal_iterations, memory_iterations=200 if quick else 2000, seed=args.seed
    )
    plans = plan_schedules(problem, anneal)
    decode, inference = profile_generation_costs(workload)
    best_rt, sweep = simulated_rt_sweep(workload, decode, inference)
    rt = best_rt if args.rt == "auto" else float(args.rt)
    workload = FusionWorkload(**{**vars(workload), "rt": rt})
    gen_unfused, gen_fused = simulated_gen_inference(workload, lengths, decode, inference)
    unit_s = 1e-4  # build_problem's time unit
    train_unfused = plans["sim_unfused"] * unit_s * workload.n_minibatches
    train_fused = plans["sim_fused"] * unit_s * workload.n_minibatches
    model = {
        "note": "cost model from 1-thread profiles: what an uncontended machine should show",
        "gen_inference_s": {"unfused": round(gen_unfused, 4), "fused": round(gen_fused, 4)},
        "train_s": {"unfused": round(train_unfused, 4), "fused": round(train_fused, 4)},
        "ratio": (gen_unfused + train_unfused) / (gen_fused + train_fused),
        "rt_sweep_s": {f"{k:g}": round(v, 4) for k, v in sweep.items()},
        "best_rt": best_rt,
        "decode_step_s": {"fixed": decode.fixed, "per_sample": decode.per_unit},
        "inference_s": {"fixed": inference.fixed, "per_token": inference.per_unit},
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
    return workload, lengths, {"plans": plans, "schedule": schedule}, model


def run(args: argparse.Namespace) -> dict[str, Any]:
    from workers.trainer.fusion import FusionCluster

    workload, lengths, planned, model = _plan(args)
    plans = planned["plans"]
    repeats = 1 if args.quick else args.repeats
    runs: dict[bool, list[Any]] = {False: [], True: []}
    sweep: dict[str, float] = {}
    with FusionCluster(workload, pin=not args.no_pin) as cluster:
        for fused in (False, True):  # warm-up: allocator, first-call paths
            cluster.run_iteration(fused, plans["fused" if fused else "unfused"], lengths)
        for _ in range(repeats):
            for fused in (False, True):
                runs[fused].append(cluster.run_iteration(fused, plans["fused" if fused else "unfused"], lengths))
        for rt in [float(x) for x in args.rt_sweep.split(",") if x.strip()]:
            sweep[f"{rt:g}"] = round(cluster.run_iteration(True, plans["fused"], lengths, rt=rt).samples_per_s, 3)
    fused_s, unfused_s = _summary(runs[True]), _summary(runs[False])
    # Back-to-back (unfused, fused) pairs see similar machine load; the median of their ratios is
    # the headline because it is robust to load spikes on a shared machine.
    pair_ratios = [u.wall_s / f.wall_s for u, f in zip(runs[False], runs[True], strict=True)]
    return {
        "fused": fused_s,
        "unfused": unfused_s,
        "ratio": statistics.median(pair_ratios),
        "target_ratio": 1.3,
        "ratio_per_pair": [round(r, 3) for r in pair_ratios],
        "ratio_of_medians": fused_s["samples_per_s"] / unfused_s["samples_per_s"],
        "ratio_gen_inference": unfused_s["gen_inference_s"] / fused_s["gen_inference_s"],
        "ratio_train": unfused_s["train_s"] / fused_s["train_s"],
        "cpu_share": round(fused_s["busy_cpu_s"] / fused_s["busy_wall_s"], 3),
        "training_schedule": planned["schedule"],
        "cost_model": model,
        "rt_sweep_samples_per_s": sweep,
        "config": {
            "batch_size": workload.batch_size,
            "rt": workload.rt,
            "repeats": repeats,
            "workers": 2,
            "prompt_len": workload.prompt_len,
            "lengths_min_median_max": [min(lengths), int(statistics.median(lengths)), max(lengths)],
            "model": workload.model,
            "minibatches": workload.n_minibatches,
            "microbatches": workload.n_microbatches,
            "inference_microbatch": workload.inference_microbatch,
            "pinned": not args.no_pin,
            "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "date": datetime.date.today().isoformat(),
        },
    }
