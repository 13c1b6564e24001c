"""The simulated half of ``flywheel bench scheduling``: tuning, evaluation and the goodput figures.

Every policy runs in the discrete-event simulator (``core.scheduling.simulator``) with the same
calibrated cost model, the same KV budget and the same online length predictor (a fresh copy per
run, so each learns from scratch). Two memory settings are compared side by side:

* ``compute_bound``: no KV limit; only the batch cap binds (a CPU worker's usual state);
* ``memory_bound``: a paged KV budget of ``--kv-tokens`` (4096 by default, the KV of 32 rows at
  the workload's mean context of about 130 tokens), as on a GPU, where vLLM's FCFS admits by
  prompt size and preempts (recomputes) when running rows outgrow the memory.

Tuning. Each policy with knobs is tuned the same way, on its own seeds (``TUNE_SEEDS``), never on
the seeds reported: ``fcfs_continuous``'s batch cap over ``FCFS_BATCHES`` and ``slo_goodput``'s
finish and reserve quantiles over ``GOODPUT_GRID``, each maximising mean SLO goodput over
``poisson_95`` and ``overload_120``.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from bench.scheduling_workloads import SLO_CLASSES, Example, workload
from core.scheduling.cost import StepCostModel
from core.scheduling.policies import SchedulerConfig, make_scheduler
from core.scheduling.predictor import LengthPredictor
from core.scheduling.simulator import Metrics, RequestOutcome, SimRequest, simulate, summarize

TUNE_SEEDS = (100, 101)
TUNE_WORKLOADS = ("poisson_95", "overload_120")
FCFS_BATCHES = (16, 24, 32, 48)
GOODPUT_GRID = tuple(itertools.product((0.3, 0.5, 0.7), (0.5, 0.7, 0.9)))
"""(finish_quantile, reserve_quantile) pairs tried for ``slo_goodput``."""
LOWEST_CLASS = SLO_CLASSES[-1]


@dataclass(frozen=True)
class Variant:
    policy: str
    config: SchedulerConfig
    oracle: bool = False
    """The scheduler is told the true output lengths (a bound, not a policy)."""


def run_variant(requests: Sequence[SimRequest], variant: Variant, cost: StepCostModel,
                predictor: LengthPredictor) -> list[RequestOutcome]:
    """Simulate one variant; the predictor is copied, so every run learns online from scratch."""
    pred = copy.deepcopy(predictor)
    cache: dict[str, Any] = {}

    def prediction(r: SimRequest) -> Any:
        if r.request_id not in cache:
            cache[r.request_id] = pred.predict(r.prompt)
        return cache[r.request_id]

    if variant.oracle:
        from core.scheduling.length import LengthDistribution

        return simulate(requests, make_scheduler(variant.policy, variant.config, cost), cost,
                        predict=lambda r: r.output_tokens,
                        predict_length=lambda r: LengthDistribution.point(r.output_tokens))
    def observe(r: SimRequest) -> None:
        pred.observe(r.prompt, r.output_tokens)

    return simulate(requests, make_scheduler(variant.policy, variant.config, cost), cost,
                    predict=lambda r: prediction(r).tokens, predict_length=lambda r: prediction(r).distribution,
                    observe=observe)


def lowest_class_p99(outcomes: Sequence[RequestOutcome]) -> float:
    """p99 latency of the least urgent class's served requests (nan if none was served)."""
    lat = [o.latency_s for o in outcomes if o.slo_class == LOWEST_CLASS and o.served]
    return float(np.percentile(lat, 99)) if lat else math.nan


def by_class(outcomes: Sequence[RequestOutcome]) -> dict[str, dict[str, float]]:
    out = {}
    for c in SLO_CLASSES:
        mine = [o for o in outcomes if o.slo_class == c]
        if mine:
            out[c] = {"attainment": float(np.mean([o.good for o in mine])),
                      "rejected": float(np.mean([not o.served for o in mine]))}
    return out


def goodput_by_quarter(outcomes: Sequence[RequestOutcome]) -> list[float]:
    """Share of each quarter's arrivals answered in full on time: shows a collapse as it builds."""
    ordered = sorted(outcomes, key=lambda o: o.arrival_s)
    quarters = np.array_split(np.arange(len(ordered)), 4)
    return [float(np.mean([ordered[i].good for i in q])) if len(q) else math.nan for q in quarters]


def metrics_row(runs: list[Metrics], p99_low: list[float]) -> dict[str, Any]:
    goodputs = [m.goodput_rps for m in runs]
    row: dict[str, Any] = {k: float(np.nanmean([getattr(m, k) for m in runs])) for k in (
        "goodput_rps", "slo_attainment", "rejected", "shortened", "mean_latency_s", "p99_latency_s", "tokens_per_s")}
    row |= {"goodput_min": float(min(goodputs)), "goodput_max": float(max(goodputs)),
            "goodput_std": float(np.std(goodputs)), "preemptions": float(np.mean([m.preemptions for m in runs])),
            "lowest_class_p99_s": float(np.nanmean(p99_low)) if not all(map(math.isnan, p99_low)) else math.nan}
    return row


def tune(pool: Sequence[Example], cost: StepCostModel, base: SchedulerConfig, cap_rps: float,
         predictor: LengthPredictor, n: int) -> dict[str, Any]:
    """The tuned batch cap of fcfs_continuous and quantiles of slo_goodput for one memory setting."""
    reqs = [workload(pool, w, n, cap_rps, cost, seed=s) for w in TUNE_WORKLOADS for s in TUNE_SEEDS]

    def score(variant: Variant) -> float:
        return float(np.mean([summarize(run_variant(r, variant, cost, predictor)).goodput_rps for r in reqs]))

    fcfs = {b: score(Variant("fcfs_continuous", dataclasses.replace(base, max_batch=b))) for b in FCFS_BATCHES}
    good = {(fq, rq): score(Variant("slo_goodput", dataclasses.replace(base, finish_quantile=fq, reserve_quantile=rq)))
            for fq, rq in GOODPUT_GRID}
    best_b = max(fcfs, key=lambda b: fcfs[b])
    best_q = max(good, key=lambda q: good[q])
    return {"fcfs_continuous": {"max_batch": best_b, "scores": {str(b): v for b, v in fcfs.items()}},
            "slo_goodput": {"finish_quantile": best_q[0], "reserve_quantile": best_q[1],
                            "scores": {f"{fq}/{rq}": v for (fq, rq), v in good.items()}}}


def tuned_variants(base: SchedulerConfig, tuning: dict[str, Any] | None) -> dict[str, Variant]:
    fcfs_cfg, good_cfg = base, base
    if tuning is not None:
        fcfs_cfg = dataclasses.replace(base, max_batch=tuning["fcfs_continuous"]["max_batch"])
        good_cfg = dataclasses.replace(base, finish_quantile=tuning["slo_goodput"]["finish_quantile"],
                                       reserve_quantile=tuning["slo_goodput"]["reserve_quantile"])
    return {"fcfs_static": Variant("fcfs_static", base), "fcfs_continuous": Variant("fcfs_continuous", fcfs_cfg),
            "sjf": Variant("sjf", base), "slo_odbs": Variant("slo_odbs", base),
            "slo_goodput": Variant("slo_goodput", good_cfg)}


def evaluate(pool: Sequence[Example], cost: StepCostModel, variants: dict[str, Variant], cap_rps: float,
             predictor: LengthPredictor, workloads: Sequence[str], n_burst: int, n: int,
             seeds: Sequence[int]) -> dict[str, Any]:
    """Per workload and variant: metrics (mean over seeds, goodput spread), per-class figures and,
    for the first seed, goodput by quarter of the run."""
    table: dict[str, Any] = {}
    for wname in workloads:
        size = n_burst if wname == "burst" else n
        reqs = [workload(pool, wname, size, cap_rps, cost, seed=s) for s in seeds]
        table[wname] = {}
        for vname, variant in variants.items():
            outs = [run_variant(r, variant, cost, predictor) for r in reqs]
            row = metrics_row([summarize(o) for o in outs], [lowest_class_p99(o) for o in outs])
            row["by_class"] = by_class([x for o in outs for x in o])
            row["goodput_by_quarter"] = goodput_by_quarter(outs[0])
            table[wname][vname] = row
    return table


def goodput_ratios(table: dict[str, Any], baseline: str = "fcfs_continuous") -> dict[str, dict[str, Any]]:
    """Best policy's goodput over the baseline's, per workload (with the best policy's name)."""
    out = {}
    for wname, rows in table.items():
        best = max(rows, key=lambda v: rows[v]["goodput_rps"])
        base = rows[baseline]["goodput_rps"]
        out[wname] = {"best_policy": best, "ratio": rows[best]["goodput_rps"] / base if base else math.inf,
                      "slo_goodput_ratio": rows["slo_goodput"]["goodput_rps"] / base if base else math.inf,
                      "upper_bound_ratio": (1.0 / rows[baseline]["slo_attainment"]
                                            if rows[baseline]["slo_attainment"] else math.inf)}
    return out
