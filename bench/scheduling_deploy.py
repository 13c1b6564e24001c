"""HELR against round robin in the simulator (``deployment`` section of ``flywheel bench scheduling``).

Instances: ``DEPLOY_INSTANCES`` random sets of four heterogeneous devices (speeds drawn from
``SPEEDS``, 4 GiB each) serving both catalogued models. A model's per-token latency on a speed-1.0
device comes from the calibrated cost model (SmolLM2) scaled by the catalogue's latency ratio
(Gemma-3). Demand: Poisson requests per model whose token rate is ``DEMAND_SHARE`` of what the
round-robin deployment can serve for that model.

Each deployment (HELR's ``plan_deployment`` and ``round_robin_deployment``) becomes one simulated
engine per replica, its step costs scaled by the replica's per-token latency (a slower device, or
a pipeline over several, is proportionally slower). A model's requests go to its replicas in
proportion to their service rates, as HELR's queueing model assumes; each replica runs
``fcfs_continuous``. Reported per instance and on average: mean latency, p99 and SLO goodput
(deadline = arrival + slack x the request's isolated time on a speed-1.0 device).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

import numpy as np

from bench.scheduling_workloads import Example, make_workload
from core.catalog import CATALOG
from core.scheduling.cost import StepCostModel
from core.scheduling.deployer import Deployment, Device, ModelProfile, plan_deployment, round_robin_deployment
from core.scheduling.policies import SchedulerConfig, make_scheduler
from core.scheduling.simulator import RequestOutcome, SimRequest, simulate, summarize

DEPLOY_INSTANCES = 5
SPEEDS = (0.25, 0.5, 1.0, 2.0)
DEMAND_SHARE = 0.6
REFERENCE_MODEL = "smollm2-135m"


def _profiles(cost: StepCostModel, demand: dict[str, float]) -> list[ModelProfile]:
    ref_ms = 1000 * cost.per_token_s(1, 256)
    ref_cat = CATALOG[REFERENCE_MODEL].per_token_latency_ms
    return [ModelProfile(name, spec.layers, spec.memory_gib, ref_ms * spec.per_token_latency_ms / ref_cat,
                         demand.get(name, 1.0)) for name, spec in CATALOG.items()]


def _simulate(deployment: Deployment, profiles: list[ModelProfile], pool: Sequence[Example], cost: StepCostModel,
              rng: random.Random, n_per_model: int, mean_tokens: float) -> list[RequestOutcome]:
    outcomes: list[RequestOutcome] = []
    for model in profiles:
        replicas = [r for r in deployment.replicas if r.model == model.name]
        mus = np.asarray([1.0 / r.placement.latency_ms for r in replicas])
        model_cost = cost.scaled(model.per_token_ms / (1000 * cost.per_token_s(1, 256)))
        rate_rps = model.demand_tokens_per_s / mean_tokens
        reqs = make_workload(pool, n_per_model, rate_rps, model_cost, seed=rng.randrange(10**6), prefix=model.name)
        assign = np.random.default_rng(rng.randrange(10**6)).choice(len(replicas), size=len(reqs), p=mus / mus.sum())
        for k, replica in enumerate(replicas):
            mine: list[SimRequest] = [r for r, a in zip(reqs, assign, strict=True) if a == k]
            if not mine:
                continue
            slow = replica.placement.latency_ms / model.per_token_ms
            rcost = model_cost.scaled(slow)
            outcomes += simulate(mine, make_scheduler("fcfs_continuous", SchedulerConfig(max_batch=32), rcost),
                                 rcost, predict=lambda r: r.output_tokens)
    return outcomes


def compare(pool: Sequence[Example], cost: StepCostModel, seed: int = 0, n_per_model: int = 120) -> dict[str, Any]:
    """HELR vs round robin on ``DEPLOY_INSTANCES`` random heterogeneous device sets."""
    rng = random.Random(seed)
    mean_tokens = float(np.mean([e.output_tokens for e in pool]))
    rows = []
    for _ in range(DEPLOY_INSTANCES):
        devices = [Device(f"d{j}", 4.0, rng.choice(SPEEDS)) for j in range(4)]
        base = _profiles(cost, {})
        rr0 = round_robin_deployment(base, devices)
        # Demand: a share of what round robin can serve per model (so the baseline is not overloaded).
        demand = {m.name: DEMAND_SHARE * sum(1000.0 / r.placement.latency_ms for r in rr0.replicas if r.model == m.name)
                  for m in base}
        profiles = _profiles(cost, demand)
        helr = plan_deployment(profiles, devices)
        rr = round_robin_deployment(profiles, devices)
        sim_seed = rng.randrange(10**6)
        result: dict[str, Any] = {"speeds": [d.speed for d in devices]}
        for name, dep in (("helr", helr), ("round_robin", rr)):
            outs = _simulate(dep, profiles, pool, cost, random.Random(sim_seed), n_per_model, mean_tokens)
            m = summarize(outs)
            result[name] = {"expected_latency_ms": dep.expected_latency_ms, "mean_latency_s": m.mean_latency_s,
                            "p99_latency_s": m.p99_latency_s, "goodput_rps": m.goodput_rps,
                            "replicas": [(r.model, list(r.placement.devices), list(r.placement.layers))
                                         for r in dep.replicas]}
        rows.append(result)

    def ratio(key: str) -> float:
        vals = [r["helr"][key] / r["round_robin"][key] for r in rows if r["round_robin"][key]]
        return float(np.mean(vals)) if vals else math.nan

    return {"instances": rows, "mean_latency_helr_over_round_robin": ratio("mean_latency_s"),
            "p99_latency_helr_over_round_robin": ratio("p99_latency_s"),
            "goodput_helr_over_round_robin": ratio("goodput_rps"),
            "expected_latency_helr_over_round_robin": ratio("expected_latency_ms")}
