"""Workloads for the scheduling benchmark: real GSM8K lengths, SLO classes, arrival processes.

Requests are GSM8K questions from RouteLLM's evaluation data; a request's output length is the
token count (SmolLM2 tokenizer) of GPT-4-1106's recorded answer, capped. The length predictor
is warm-started on a training split and every workload draws from the held-out split.

SLO classes. A request's deadline is ``arrival + slack * T_iso``, where T_iso is its isolated
service time on the calibrated engine (prefill plus one decode step per further token at batch
size 1): the SLO is a tolerated *slowdown*, the usual definition for mixed-length traffic.
The slack follows the project's replication plan for UELLM (workload W2): slack ~ U[2, 10]
per request. Requests are labelled by the third of that range they fall in (``interactive``
[2, 4.67), ``standard`` [4.67, 7.33), ``batch`` [7.33, 10]) so results can be read per class.
These values were fixed before any policy was run and are not tuned to the results.

Load. ``capacity_rps`` is the saturated throughput (requests/s) of ``fcfs_continuous`` at the
batch cap (and KV budget) on a long burst, simulated with the calibrated cost model; ``poisson_X``
draws exponential inter-arrival gaps at X% of it (``overload_120``: 120 %, more than the engine
can serve, the regime where FCFS collapses); ``onoff`` alternates ``ONOFF_PERIOD`` of Poisson
arrivals at twice its mean load with the same time of silence (bursty traffic, 90 % on average).
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from core.scheduling.cost import StepCostModel
from core.scheduling.policies import SchedulerConfig, make_scheduler
from core.scheduling.simulator import SimRequest, simulate

RESPONSE_COLUMN = "gpt-4-1106-preview_response"
SLACK_RANGE = (2.0, 10.0)
"""Deadline slack, uniform per request (UELLM replication plan, workload W2)."""
SLO_CLASSES: tuple[str, ...] = ("interactive", "standard", "batch")
"""Labels for the lower, middle and upper third of ``SLACK_RANGE``."""
WORKLOADS: dict[str, float | None] = {"burst": None, "poisson_50": 0.5, "poisson_80": 0.8, "poisson_95": 0.95,
                                      "overload_120": 1.2, "onoff": 0.9}
"""Workload name -> mean load as a share of capacity (None: every request arrives at t = 0)."""
ONOFF_PERIOD_SERVICES = 4.0
"""``onoff`` switches every this many mean isolated service times (on, then as long off)."""


@dataclass(frozen=True)
class Example:
    prompt: str
    prompt_ids: tuple[int, ...]
    output_tokens: int


def load_examples(
    data_dir: Path,
    encode_prompt: Callable[[str], list[int]],
    count_tokens: Callable[[str], int],
    cap: int,
    cache_dir: Path,
) -> list[Example]:
    """GSM8K prompts (chat-templated ids) with capped answer lengths; cached by data hash and cap."""
    src = data_dir / "gsm8k" / "gsm8k_responses.csv"
    raw = src.read_bytes()
    key = hashlib.sha256(raw).hexdigest()[:16]
    cache = cache_dir / f"gsm8k-{key}-cap{cap}.json"
    if cache.exists():
        return [Example(d["prompt"], tuple(d["prompt_ids"]), d["output_tokens"]) for d in json.loads(cache.read_text())]
    with src.open(newline="") as f:
        rows = list(csv.DictReader(f))
    examples = [
        Example(r["prompt"], tuple(encode_prompt(r["prompt"])), max(1, min(cap, count_tokens(r[RESPONSE_COLUMN]))))
        for r in rows
    ]
    cache_dir.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps([asdict(e) for e in examples]))
    return examples


def split(examples: Sequence[Example], train_share: float, seed: int) -> tuple[list[Example], list[Example]]:
    order = np.random.default_rng(seed).permutation(len(examples))
    cut = int(len(examples) * train_share)
    return [examples[i] for i in order[:cut]], [examples[i] for i in order[cut:]]


def isolated_service_s(prompt_tokens: int, output_tokens: int, cost: StepCostModel) -> float:
    """Time to serve a request alone: prefill, then a decode step per further token."""
    steps = max(output_tokens - 1, 0)
    mean_window = prompt_tokens + (output_tokens + 1) / 2
    return cost.prefill_s(1, prompt_tokens) + steps * cost.decode_s(1, math.ceil(mean_window))


def make_workload(
    pool: Sequence[Example],
    n: int,
    rate_rps: float | None,
    cost: StepCostModel,
    *,
    seed: int,
    prefix: str = "r",
    slack_range: tuple[float, float] = SLACK_RANGE,
    onoff_period_s: float | None = None,
) -> list[SimRequest]:
    """``n`` requests drawn from ``pool``; all at t = 0 when ``rate_rps`` is None, else Poisson at
    ``rate_rps`` on average, or, with ``onoff_period_s``, at twice that during alternate periods."""
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(pool), size=n, replace=n > len(pool))
    if rate_rps is None:
        arrivals = np.zeros(n)
    elif onoff_period_s is None:
        arrivals = np.cumsum(rng.exponential(1.0 / rate_rps, size=n))
        arrivals -= arrivals[0]
    else:
        # Poisson at 2x the mean rate in "on" time; every on-period is followed by as long a silence.
        on_time = np.cumsum(rng.exponential(1.0 / (2 * rate_rps), size=n))
        on_time -= on_time[0]
        arrivals = on_time + np.floor(on_time / onoff_period_s) * onoff_period_s
    lo, hi = slack_range
    slacks = rng.uniform(lo, hi, size=n)
    out = []
    for i, (pick, t, slack) in enumerate(zip(picks, arrivals, slacks, strict=True)):
        ex = pool[int(pick)]
        third = min(int(3 * (slack - lo) / (hi - lo)), 2) if hi > lo else 0
        iso = isolated_service_s(len(ex.prompt_ids), ex.output_tokens, cost)
        out.append(
            SimRequest(
                request_id=f"{prefix}{i}",
                arrival_s=float(t),
                prompt_tokens=len(ex.prompt_ids),
                output_tokens=ex.output_tokens,
                deadline_s=float(t) + float(slack) * iso,
                slo_class=SLO_CLASSES[third],
                prompt=ex.prompt,
            )
        )
    return out


def mean_isolated_service_s(pool: Sequence[Example], cost: StepCostModel) -> float:
    return float(np.mean([isolated_service_s(len(e.prompt_ids), e.output_tokens, cost) for e in pool]))


def workload(pool: Sequence[Example], name: str, n: int, cap_rps: float, cost: StepCostModel, *, seed: int,
             prefix: str = "r", slack_range: tuple[float, float] = SLACK_RANGE) -> list[SimRequest]:
    """The named workload (``WORKLOADS``) at the given capacity."""
    load = WORKLOADS[name]
    period = ONOFF_PERIOD_SERVICES * mean_isolated_service_s(pool, cost) if name == "onoff" else None
    return make_workload(pool, n, None if load is None else load * cap_rps, cost, seed=seed, prefix=prefix,
                         slack_range=slack_range, onoff_period_s=period)


def capacity_rps(
    pool: Sequence[Example], cost: StepCostModel, config: SchedulerConfig, n: int = 300, seed: int = 12345
) -> float:
    """Saturated request throughput of fcfs_continuous (simulated burst of ``n`` requests)."""
    burst = make_workload(pool, n, None, cost, seed=seed)
    outs = simulate(burst, make_scheduler("fcfs_continuous", config, cost), cost, predict=lambda r: r.output_tokens)
    makespan = max(o.finish_s for o in outs)
    return n / makespan
