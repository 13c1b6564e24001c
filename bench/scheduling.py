"""``flywheel bench scheduling``: UELLM policies in a calibrated simulator and on the real engine.

1. Data: GSM8K prompts with GPT-4's answer lengths (SmolLM2 tokens, capped at 256); 70% warm-start
   the length predictor, whose held-out bucket accuracy is ``predictor_accuracy``; workloads
   draw from the other 30%.
2. Calibration: real TorchEngine step latency on SmolLM2 at batch sizes 1..32 -> StepCostModel
   (cached under ``.flywheel/cache/scheduling``).
3. ``sim``: every policy on ``burst`` and ``poisson_{50,80,95}`` (share of simulated capacity),
   mean over seeds.
4. ``real``: the same Poisson workload at 80% load (>= 64 requests) through ``ServingLoop`` and
   the real SmolLM2 with wall-clock arrivals, for fcfs_static, fcfs_continuous and slo_odbs.
   Like vLLM's serving benchmark, each request generates exactly its recorded length
   (``ignore_eos``), and the scheduler is not told that length.
5. ``sim_vs_real_error``: mean over those three policies of |sim - real| / real of the mean
   latency, where sim replays the identical requests and arrival times.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.scheduling_calibration import TimedEngine, load_or_calibrate, probe_drift
from bench.scheduling_workloads import (
    SLACK_RANGE,
    SLO_CLASSES,
    WORKLOADS,
    Example,
    capacity_rps,
    load_examples,
    make_workload,
    split,
)
from core.scheduling.cost import StepCostModel
from core.scheduling.policies import POLICIES, SchedulerConfig, make_scheduler
from core.scheduling.predictor import LengthPredictor, evaluate
from core.scheduling.simulator import Metrics, RequestOutcome, SimRequest, simulate, summarize

REAL_POLICIES = ("fcfs_static", "fcfs_continuous", "slo_odbs")
METRIC_KEYS = ("mean_latency_s", "p99_latency_s", "slo_attainment", "tokens_per_s")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, default=Path("data/routellm"), help="RouteLLM eval data directory")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--cache-dir", type=Path, default=Path(".flywheel/cache/scheduling"))
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the real engine")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--cap", type=int, default=256, help="output length cap (tokens)")
    parser.add_argument("--sim-burst", type=int, default=200, help="requests in the simulated burst")
    parser.add_argument("--sim-poisson", type=int, default=360, help="requests per simulated Poisson run")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--real-requests", type=int, default=64)
    parser.add_argument("--real-load", type=float, default=0.8, help="real run load (share of capacity)")
    parser.add_argument("--skip-real", action="store_true", help="simulation only (no model load)")
    parser.add_argument("--recalibrate", action="store_true", help="ignore the cached calibration")
    parser.add_argument("--quick", action="store_true", help="short form: small runs, quick calibration")


def _metrics(m: Metrics) -> dict[str, float]:
    return {k: float(getattr(m, k)) for k in METRIC_KEYS}


def _mean_metrics(runs: list[Metrics]) -> dict[str, float]:
    return {k: float(np.mean([getattr(m, k) for m in runs])) for k in METRIC_KEYS}


def _sim(
    requests: list[SimRequest],
    policy: str,
    cost: StepCostModel,
    cfg: SchedulerConfig,
    predictor: LengthPredictor,
    oracle: bool = False,
) -> list[RequestOutcome]:
    """Simulate one policy; the predictor is copied, so every run learns online from scratch."""
    pred = copy.deepcopy(predictor)
    prompts = {r.request_id: r.prompt for r in requests}
    return simulate(
        requests,
        make_scheduler(policy, cfg, cost),
        cost,
        predict=(lambda r: r.output_tokens) if oracle else (lambda r: pred.predict(r.prompt).tokens),
        observe=lambda r: _observe(pred, prompts[r.request_id], r.output_tokens),
    )


def _observe(pred: LengthPredictor, prompt: str, n: int) -> None:
    pred.observe(prompt, n)


def _run_real(
    engine: Any,
    requests: list[SimRequest],
    examples: dict[str, Example],
    policy: str,
    cost: StepCostModel,
    cfg: SchedulerConfig,
    predictor: LengthPredictor,
) -> dict[str, Any]:
    """Serve ``requests`` through ServingLoop with wall-clock arrivals; returns outcomes and logs."""
    from workers.engines.base import SamplingParams
    from workers.serving import FinalEvent, ServeRequest, ServingConfig, ServingLoop

    timed = TimedEngine(engine)
    pred = copy.deepcopy(predictor)
    loop = ServingLoop(
        timed, pred, ServingConfig(policy=policy, scheduler=cfg, clamp_prediction_to_max_tokens=False), cost
    )
    pending = sorted(requests, key=lambda r: r.arrival_s)
    t0 = time.monotonic() + 0.05
    finals: dict[str, FinalEvent] = {}
    nxt = 0
    while len(finals) < len(pending):
        now = time.monotonic()
        while nxt < len(pending) and t0 + pending[nxt].arrival_s <= now:
            r = pending[nxt]
            ex = examples[r.request_id]
            loop.admit(
                ServeRequest(
                    r.request_id,
                    r.prompt,
                    SamplingParams(max_tokens=r.output_tokens, ignore_eos=True),
                    slo_s=r.deadline_s - r.arrival_s,
                    slo_class=r.slo_class,
                    arrival_s=t0 + r.arrival_s,
                    prompt_ids=ex.prompt_ids,
                )
            )
            nxt += 1
        if loop.has_work():
            for ev in loop.step():
                if isinstance(ev, FinalEvent):
                    finals[ev.request_id] = ev
        elif nxt < len(pending):
            time.sleep(max(0.0, t0 + pending[nxt].arrival_s - time.monotonic()))
    by_id = {r.request_id: r for r in requests}
    outcomes = [
        RequestOutcome(
            rid,
            by_id[rid].arrival_s,
            by_id[rid].arrival_s + f.first_token_s,
            by_id[rid].arrival_s + f.total_s,
            f.output_tokens,
            by_id[rid].deadline_s,
            by_id[rid].slo_class,
        )
        for rid, f in finals.items()
    ]
    return {"outcomes": outcomes, "log": timed.log, "online_accuracy": pred.accuracy}


def _iteration_error(log: list[tuple[int, int, int, int, float]], cost: StepCostModel) -> dict[str, float]:
    """How well the cost model predicts the real run's own iterations (engine time only)."""
    pred = np.asarray([cost.iteration_s(dec, win, pre, plen) - cost.overhead_s for dec, win, pre, plen, _ in log])
    real = np.asarray([secs for *_, secs in log])
    if not len(real):
        return {}
    return {
        "median_rel_error": float(np.median(np.abs(pred - real) / real)),
        "total_real_over_predicted": float(real.sum() / pred.sum()),
    }


def _rel(predicted: float, actual: float) -> float:
    return abs(predicted - actual) / actual


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def _variants(cfg: SchedulerConfig) -> dict[str, tuple[str, SchedulerConfig, bool]]:
    """(policy, config, oracle lengths) per reported variant: the four policies at the common batch
    cap; UELLM's own static baseline (batches of 10); SJF told the true lengths (a bound on what
    length-aware ordering can gain)."""
    out = {p: (p, cfg, False) for p in POLICIES}
    out["fcfs_static_b10"] = ("fcfs_static", dataclasses.replace(cfg, max_batch=10), False)
    out["sjf_oracle"] = ("sjf", cfg, True)
    return out


def _simulate_all(
    args: argparse.Namespace,
    pool: list[Example],
    cost: StepCostModel,
    cfg: SchedulerConfig,
    cap_rps: float,
    predictor: LengthPredictor,
) -> tuple[dict[str, dict[str, dict[str, float]]], dict[str, dict[str, dict[str, float]]]]:
    """Metrics per workload and policy variant (mean over seeds), and SLO attainment per class."""
    sim: dict[str, dict[str, dict[str, float]]] = {}
    by_class: dict[str, dict[str, dict[str, float]]] = {}
    variants = _variants(cfg)
    for wname, load in WORKLOADS.items():
        n = min(args.sim_burst if load is None else args.sim_poisson, len(pool))
        runs: dict[str, list[Metrics]] = {v: [] for v in variants}
        met: dict[str, dict[str, list[bool]]] = {v: {c: [] for c in SLO_CLASSES} for v in variants}
        for seed in range(args.seeds):
            rate = None if load is None else load * cap_rps
            reqs = make_workload(pool, n, rate, cost, seed=1000 + seed)
            for name, (policy, vcfg, oracle) in variants.items():
                outs = _sim(reqs, policy, cost, vcfg, predictor, oracle)
                runs[name].append(summarize(outs))
                for o in outs:
                    met[name][o.slo_class].append(o.met_slo)
        sim[wname] = {v: _mean_metrics(ms) for v, ms in runs.items()}
        by_class[wname] = {v: {c: float(np.mean(m)) for c, m in cls.items() if m} for v, cls in met.items()}
    return sim, by_class


def _slack_sensitivity(
    args: argparse.Namespace,
    pool: list[Example],
    cost: StepCostModel,
    cfg: SchedulerConfig,
    cap_rps: float,
    predictor: LengthPredictor,
) -> dict[str, dict[str, float]]:
    """poisson_80 SLO attainment when every deadline is tighter than W2's U[2, 10] (a what-if)."""
    out: dict[str, dict[str, float]] = {}
    for lo, hi in ((1.5, 3.0), (2.0, 10.0)):
        reqs = make_workload(
            pool, min(args.sim_poisson, len(pool)), 0.8 * cap_rps, cost, seed=1000, slack_range=(lo, hi)
        )
        out[f"slack_U[{lo},{hi}]"] = {
            p: summarize(_sim(reqs, p, cost, cfg, predictor)).slo_attainment
            for p in ("fcfs_continuous", "sjf", "slo_odbs")
        }
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.time()
    if args.quick:
        args.sim_burst, args.sim_poisson, args.seeds = min(args.sim_burst, 64), min(args.sim_poisson, 120), 1
        args.real_requests, args.cap = min(args.real_requests, 16), min(args.cap, 128)
    import torch

    torch.set_num_threads(args.threads)
    from core.catalog import get_model
    from models.loader import load_tokenizer
    from workers.engines.torch_engine import encode_chat

    kind = "quick" if args.quick else "full"
    cache = args.cache_dir / f"calibration-{args.model}-cpu-t{args.threads}-torch{torch.__version__}-{kind}.json"
    engine = None
    if args.skip_real and cache.exists() and not args.recalibrate:
        tokenizer = load_tokenizer(get_model(args.model))
    else:
        from workers.engines.torch_engine import TorchEngine

        engine = TorchEngine.from_catalog(args.model, device="cpu")
        tokenizer = engine.tokenizer
    examples = load_examples(
        args.data,
        lambda p: encode_chat(tokenizer, p),
        lambda t: len(tokenizer.encode(t, add_special_tokens=False)),
        args.cap,
        args.cache_dir,
    )
    train, test = split(examples, 0.7, seed=0)
    predictor = LengthPredictor()
    predictor.fit([(e.prompt, e.output_tokens) for e in train])
    report = evaluate(predictor, [(e.prompt, e.output_tokens) for e in test])

    if engine is not None:
        cost, calib = load_or_calibrate(engine, cache, quick=args.quick, force=args.recalibrate)
    else:
        cost = StepCostModel(**json.loads(cache.read_text())["model"])
        calib = {"source": "cached (not re-probed: no model loaded)"}
    cfg = SchedulerConfig(max_batch=args.max_batch)
    cap_rps = capacity_rps(test, cost, cfg, n=min(300, len(test)))
    sim, by_class = _simulate_all(args, test, cost, cfg, cap_rps, predictor)
    sensitivity = _slack_sensitivity(args, test, cost, cfg, cap_rps, predictor)

    real: dict[str, dict[str, float]] = {}
    sim_for_real: dict[str, dict[str, float]] = {}
    diagnostics: dict[str, Any] = {}
    errors: list[float] = []
    n_real = 0
    corrected_errors: list[float] = []
    workload_speed = float("nan")
    if engine is not None and not args.skip_real:
        # The machine is shared: its speed drifts. The real workload is sized for the speed measured
        # now, and before each run the speed is probed again; the scheduler and the simulator's
        # prediction of that run both use the calibrated model scaled by it.
        workload_speed = probe_drift(engine, cost)
        now_cost = cost.scaled(workload_speed)
        real_rate = args.real_load * capacity_rps(test, now_cost, cfg, n=min(300, len(test)))
        reqs = make_workload(test, min(args.real_requests, len(test)), real_rate, now_cost, seed=7, prefix="real")
        by_prompt = {e.prompt: e for e in test}
        ex_of = {r.request_id: by_prompt[r.prompt] for r in reqs}
        n_real = len(reqs)
        for policy in REAL_POLICIES:
            speed = probe_drift(engine, cost)
            run_cost = cost.scaled(speed)
            res = _run_real(engine, reqs, ex_of, policy, run_cost, cfg, predictor)
            real[policy] = _metrics(summarize(res["outcomes"]))
            sim_for_real[policy] = _metrics(summarize(_sim(reqs, policy, run_cost, cfg, predictor)))
            errors.append(_rel(sim_for_real[policy]["mean_latency_s"], real[policy]["mean_latency_s"]))
            it = _iteration_error(res["log"], run_cost)
            # Diagnostic: the same prediction given the speed the machine actually had during the run.
            during = cost.scaled(speed * it.get("total_real_over_predicted", 1.0))
            corrected = _metrics(summarize(_sim(reqs, policy, during, cfg, predictor)))
            corrected_errors.append(_rel(corrected["mean_latency_s"], real[policy]["mean_latency_s"]))
            diagnostics[policy] = {
                "machine_speed_factor_before_run": speed,
                "iterations": len(res["log"]),
                **it,
                "sim_mean_latency_s_at_speed_during_run": corrected["mean_latency_s"],
                "predictor_online_accuracy": res["online_accuracy"],
            }

    burst, p80 = sim["burst"], sim["poisson_80"]
    burst_ratio = _ratio(burst["slo_odbs"]["mean_latency_s"], burst["fcfs_static"]["mean_latency_s"])
    slo_ratio = _ratio(p80["slo_odbs"]["slo_attainment"], p80["fcfs_continuous"]["slo_attainment"])
    sim_err = float(np.mean(errors)) if errors else float("nan")
    ratios = {
        "burst_mean_latency_slo_odbs_over_fcfs_static": burst_ratio,
        "burst_mean_latency_slo_odbs_over_fcfs_static_b10": _ratio(
            burst["slo_odbs"]["mean_latency_s"], burst["fcfs_static_b10"]["mean_latency_s"]
        ),
        "burst_mean_latency_slo_odbs_over_fcfs_continuous": _ratio(
            burst["slo_odbs"]["mean_latency_s"], burst["fcfs_continuous"]["mean_latency_s"]
        ),
        "burst_mean_latency_fcfs_continuous_over_fcfs_static": _ratio(
            burst["fcfs_continuous"]["mean_latency_s"], burst["fcfs_static"]["mean_latency_s"]
        ),
        "poisson_80_slo_attainment_slo_odbs_over_fcfs_continuous": slo_ratio,
        "poisson_95_slo_attainment_slo_odbs_over_fcfs_continuous": _ratio(
            sim["poisson_95"]["slo_odbs"]["slo_attainment"], sim["poisson_95"]["fcfs_continuous"]["slo_attainment"]
        ),
        "poisson_80_slo_attainment_slo_odbs_over_fcfs_static": _ratio(
            p80["slo_odbs"]["slo_attainment"], p80["fcfs_static"]["slo_attainment"]
        ),
    }
    if real:
        ratios["real_mean_latency_slo_odbs_over_fcfs_static"] = _ratio(
            real["slo_odbs"]["mean_latency_s"], real["fcfs_static"]["mean_latency_s"]
        )
        ratios["real_slo_attainment_slo_odbs_over_fcfs_continuous"] = _ratio(
            real["slo_odbs"]["slo_attainment"], real["fcfs_continuous"]["slo_attainment"]
        )
    return {
        "sim": sim,
        "real": real,
        "predictor_accuracy": report.accuracy,
        "sim_vs_real_error": sim_err,
        "ratios": ratios,
        "targets": {
            "burst_mean_latency_ratio": {"value": burst_ratio, "target": "<= 0.3", "met": burst_ratio <= 0.3},
            "poisson_80_slo_attainment_ratio": {"value": slo_ratio, "target": ">= 1.2", "met": slo_ratio >= 1.2},
            "sim_vs_real_error": {"value": sim_err, "target": "<= 0.25", "met": bool(sim_err <= 0.25)},
        },
        "sim_vs_real_error_at_speed_during_run": float(np.mean(corrected_errors)) if corrected_errors else float("nan"),
        "sim_slo_attainment_by_class": by_class,
        "sim_slack_sensitivity_poisson_80": sensitivity,
        "sim_for_real": sim_for_real,
        "real_diagnostics": diagnostics,
        "predictor": {
            "accuracy": report.accuracy,
            "within_one_bucket": report.within_one,
            "majority_class_accuracy": report.majority_accuracy,
            "mae_tokens": report.mae_tokens,
            "n_test": report.n,
            "n_train": len(train),
        },
        "calibration": {"model": {k: float(v) for k, v in vars(cost).items()}, **calib},
        "config": {
            "model": args.model,
            "threads": args.threads,
            "max_batch": args.max_batch,
            "cap": args.cap,
            "capacity_rps": cap_rps,
            "sim_burst": args.sim_burst,
            "sim_poisson": args.sim_poisson,
            "seeds": args.seeds,
            "real_requests": n_real,
            "real_workload_speed_factor": workload_speed,
            "real_load": args.real_load,
            "slack_range": list(SLACK_RANGE),
            "slo_classes": list(SLO_CLASSES),
            "quick": bool(args.quick),
        },
        "wall_s": time.time() - started,
    }
