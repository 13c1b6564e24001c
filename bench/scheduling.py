"""``flywheel bench scheduling``: SLO goodput of the scheduling policies, simulated and on the real engine.

1. Data: GSM8K prompts with GPT-4's answer lengths (SmolLM2 tokens, capped at 256); 70 % warm-start
   the length predictor (held-out bucket accuracy: ``predictor``), workloads draw from the other 30 %.
2. Calibration: real TorchEngine step latency at batch sizes 1..32 -> StepCostModel (cached under
   ``.flywheel/cache/scheduling``; re-measured when a probe disagrees by more than 35 %).
3. ``sim``: per memory setting (``compute_bound``, ``memory_bound``; see ``bench.scheduling_sim``),
   policies tuned on their own seeds, then every policy on every workload (``burst``,
   ``poisson_{50,80,95}``, ``overload_120``, ``onoff``) over ``--seeds`` seeds: SLO goodput
   (requests answered in full within their SLO per second of offered load), attainment,
   rejections, the lowest SLO class's p99, goodput by quarter of the run.
4. ``real``: ``poisson_95`` and ``overload_120`` on the real engine with wall-clock arrivals, in the
   ``memory_bound`` setting, for ``fcfs_continuous`` and ``slo_goodput`` (identical requests).
5. ``sim_vs_real_error``: mean over the real runs of |sim - real| / real of the served requests'
   mean latency, the simulation replaying the identical requests and arrival times.
6. ``deployment``: HELR against round robin on random heterogeneous devices, in the simulator
   (``bench.scheduling_deploy``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.scheduling_calibration import load_or_calibrate, probe_drift
from bench.scheduling_deploy import compare as compare_deployments
from bench.scheduling_real import describe, iteration_error, run_real
from bench.scheduling_sim import evaluate, goodput_ratios, run_variant, tune, tuned_variants
from bench.scheduling_workloads import SLACK_RANGE, SLO_CLASSES, WORKLOADS, capacity_rps, load_examples, split, workload
from core.scheduling.cost import StepCostModel
from core.scheduling.kv import KvBudget
from core.scheduling.policies import SchedulerConfig
from core.scheduling.predictor import LengthPredictor
from core.scheduling.predictor import evaluate as evaluate_predictor

REAL_WORKLOADS = ("poisson_95", "overload_120")
REAL_POLICIES = ("fcfs_continuous", "slo_goodput")
TARGET_WORKLOADS = ("poisson_95", "overload_120")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, default=Path("data/routellm"), help="RouteLLM eval data directory")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="cpu", help="real engine device (cpu or cuda)")
    parser.add_argument("--cache-dir", type=Path, default=Path(".flywheel/cache/scheduling"))
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the real engine")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--kv-tokens", type=int, default=4096, help="KV budget of the memory_bound setting")
    parser.add_argument("--cap", type=int, default=256, help="output length cap (tokens)")
    parser.add_argument("--sim-burst", type=int, default=200, help="requests in the simulated burst")
    parser.add_argument("--sim-requests", type=int, default=360, help="requests per simulated arrival-process run")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--real-requests", type=int, default=64)
    parser.add_argument("--real-setting", choices=("memory_bound", "compute_bound"), default="memory_bound")
    parser.add_argument("--real-workloads", default=",".join(REAL_WORKLOADS))
    parser.add_argument("--tuning-json", type=Path, default=None,
                        help="with --real-only: take the tuned policies from an earlier run's JSON")
    parser.add_argument("--skip-real", action="store_true", help="simulation only")
    parser.add_argument("--real-only", action="store_true", help="the real section only (untuned defaults)")
    parser.add_argument("--recalibrate", action="store_true", help="ignore the cached calibration")
    parser.add_argument("--quick", action="store_true", help="short form: small runs, one seed, quick calibration")


def _ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


def _settings(args: argparse.Namespace) -> dict[str, SchedulerConfig]:
    base = SchedulerConfig(max_batch=args.max_batch)
    return {"compute_bound": base,
            "memory_bound": dataclasses.replace(base, kv=KvBudget(total_blocks=max(args.kv_tokens // 16, 2)))}


def _simulate(args: argparse.Namespace, pool: list[Any], cost: StepCostModel, predictor: LengthPredictor
              ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], dict[str, float]]:
    sims: dict[str, Any] = {}
    ratios: dict[str, Any] = {}
    tuning: dict[str, Any] = {}
    caps: dict[str, float] = {}
    seeds = [1000 + s for s in range(args.seeds)]
    for name, base in _settings(args).items():
        caps[name] = capacity_rps(pool, cost, base, n=min(300, len(pool)))
        tuning[name] = tune(pool, cost, base, caps[name], predictor, n=min(args.sim_requests, 240))
        variants = tuned_variants(base, tuning[name])
        sims[name] = evaluate(pool, cost, variants, caps[name], predictor, list(WORKLOADS), args.sim_burst,
                              args.sim_requests, seeds)
        ratios[name] = goodput_ratios(sims[name])
    return sims, ratios, tuning, caps


def _real(args: argparse.Namespace, engine: Any, pool: list[Any], cost: StepCostModel, predictor: LengthPredictor,
          tuning: dict[str, Any] | None) -> dict[str, Any]:
    base = _settings(args)[args.real_setting]
    variants = tuned_variants(base, tuning)
    workloads = args.real_workloads.split(",")
    by_prompt = {e.prompt: e for e in pool}
    real: dict[str, Any] = {}
    sim_for_real: dict[str, Any] = {}
    diagnostics: dict[str, Any] = {}
    errors: list[float] = []
    goodput_errors: list[float] = []
    for wname in workloads:
        # Sized for the speed the machine has now; both policies serve the identical requests.
        speed = probe_drift(engine, cost)
        now_cost = cost.scaled(speed)
        cap = capacity_rps(pool, now_cost, base, n=min(300, len(pool)))
        reqs = workload(pool, wname, min(args.real_requests, len(pool)), cap, now_cost, seed=7, prefix="real")
        examples = {r.request_id: by_prompt[r.prompt] for r in reqs}
        real[wname], sim_for_real[wname], diagnostics[wname] = {}, {}, {}
        for policy in REAL_POLICIES:
            run_speed = probe_drift(engine, cost)
            run_cost = cost.scaled(run_speed)
            res = run_real(engine, reqs, examples, variants[policy], run_cost, predictor)
            real[wname][policy] = describe(res.outcomes)
            sim = describe(run_variant(reqs, variants[policy], run_cost, predictor))
            sim_for_real[wname][policy] = sim
            errors.append(abs(sim["mean_latency_s"] - real[wname][policy]["mean_latency_s"])
                          / real[wname][policy]["mean_latency_s"])
            if real[wname][policy]["goodput_rps"]:
                goodput_errors.append(abs(sim["goodput_rps"] - real[wname][policy]["goodput_rps"])
                                      / real[wname][policy]["goodput_rps"])
            diagnostics[wname][policy] = {"machine_speed_factor_before_run": run_speed,
                                          "workload_speed_factor": speed, "capacity_rps": cap,
                                          "iterations": len(res.log), **iteration_error(res.log, run_cost),
                                          "online_calibration_error": iteration_error(res.log, res.final_cost),
                                          "predictor_online_accuracy": res.online_accuracy}
    ratios = {w: _ratio(real[w]["slo_goodput"]["goodput_rps"], real[w]["fcfs_continuous"]["goodput_rps"])
              for w in workloads}
    return {"real": real, "real_ratios": ratios, "sim_for_real": sim_for_real, "real_diagnostics": diagnostics,
            "sim_vs_real_error": float(np.mean(errors)) if errors else math.nan,
            "sim_vs_real_goodput_error": float(np.mean(goodput_errors)) if goodput_errors else math.nan,
            "real_setting": args.real_setting, "real_requests": len(reqs),
            "real_tuning": tuning}


def _targets(ratios: dict[str, Any], real: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for setting, by_workload in ratios.items():
        for w in TARGET_WORKLOADS:
            value = by_workload[w]["ratio"]
            out[f"sim_{setting}_{w}_goodput_ratio"] = {"value": value, "target": ">= 2.0", "met": value >= 2.0,
                                                       "best_policy": by_workload[w]["best_policy"]}
    for w, value in real.get("real_ratios", {}).items():
        out[f"real_{w}_goodput_ratio"] = {"value": value, "target": ">= 1.5", "met": bool(value >= 1.5)}
    err = real.get("sim_vs_real_error", math.nan)
    out["sim_vs_real_error"] = {"value": err, "target": "<= 0.25", "met": bool(err <= 0.25)}
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.time()
    if args.quick:
        args.sim_burst, args.sim_requests, args.seeds = min(args.sim_burst, 64), min(args.sim_requests, 120), 1
        args.real_requests, args.cap = min(args.real_requests, 16), min(args.cap, 128)
    import torch

    torch.set_num_threads(args.threads)
    from core.catalog import get_model
    from models.loader import load_tokenizer
    from workers.engines.torch_engine import encode_chat

    kind = "quick" if args.quick else "full"
    cache = args.cache_dir / (f"calibration-{args.model}-{args.device}-t{args.threads}-torch{torch.__version__}"
                              f"-{kind}.json")
    engine = None
    if args.skip_real and cache.exists() and not args.recalibrate:
        tokenizer = load_tokenizer(get_model(args.model))
    else:
        from workers.engines.torch_engine import TorchEngine

        engine = TorchEngine.from_catalog(args.model, device=args.device)
        tokenizer = engine.tokenizer
    examples = load_examples(args.data, lambda p: encode_chat(tokenizer, p),
                             lambda t: len(tokenizer.encode(t, add_special_tokens=False)), args.cap, args.cache_dir)
    train, test = split(examples, 0.7, seed=0)
    predictor = LengthPredictor()
    predictor.fit([(e.prompt, e.output_tokens) for e in train])
    report = evaluate_predictor(predictor, [(e.prompt, e.output_tokens) for e in test])
    if engine is not None:
        cost, calib = load_or_calibrate(engine, cache, quick=args.quick, force=args.recalibrate)
    else:
        cost = StepCostModel(**json.loads(cache.read_text())["model"])
        calib = {"source": "cached (not re-probed: no model loaded)"}

    sims: dict[str, Any] = {}
    ratios: dict[str, Any] = {}
    tuning: dict[str, Any] = {}
    caps: dict[str, float] = {}
    deployment: dict[str, Any] = {}
    if not args.real_only:
        sims, ratios, tuning, caps = _simulate(args, test, cost, predictor)
        deployment = compare_deployments(test, cost, n_per_model=40 if args.quick else 120)
    real: dict[str, Any] = {}
    if args.tuning_json is not None and not tuning:
        tuning = json.loads(args.tuning_json.read_text())["tuning"]
    if engine is not None and not args.skip_real:
        real = _real(args, engine, test, cost, predictor, tuning.get(args.real_setting))
    legacy = {}
    if "compute_bound" in sims:
        burst = sims["compute_bound"]["burst"]
        legacy["burst_mean_latency_slo_odbs_over_fcfs_static"] = _ratio(burst["slo_odbs"]["mean_latency_s"],
                                                                        burst["fcfs_static"]["mean_latency_s"])
        legacy["burst_mean_latency_slo_goodput_over_fcfs_static"] = _ratio(
            burst["slo_goodput"]["mean_latency_s"], burst["fcfs_static"]["mean_latency_s"])
    return {
        "sim": sims,
        "ratios": ratios,
        **real,
        "targets": _targets(ratios, real),
        "legacy_ratios": legacy,
        "tuning": tuning,
        "deployment": deployment,
        "predictor": {"accuracy": report.accuracy, "within_one_bucket": report.within_one,
                      "majority_class_accuracy": report.majority_accuracy, "mae_tokens": report.mae_tokens,
                      "n_test": report.n, "n_train": len(train)},
        "calibration": {"model": dataclasses.asdict(cost), **calib},
        "config": {"model": args.model, "device": args.device, "threads": args.threads, "max_batch": args.max_batch,
                   "kv_tokens_memory_bound": args.kv_tokens, "cap": args.cap, "capacity_rps": caps,
                   "sim_burst": args.sim_burst, "sim_requests": args.sim_requests, "seeds": args.seeds,
                   "slack_range": list(SLACK_RANGE), "slo_classes": list(SLO_CLASSES), "quick": bool(args.quick),
                   "goodput": "requests answered in full within their SLO per second of offered load "
                              "(first to last arrival; the makespan for a burst)"},
        "wall_s": time.time() - started,
    }

