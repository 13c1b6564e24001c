"""The real half of ``flywheel bench scheduling``: policies on the live engine with wall-clock arrivals.

A workload's requests arrive on the wall clock into a ``ServingLoop`` over the real engine; each
generates exactly its recorded length (``ignore_eos``, as vLLM's serving benchmark does) and the
scheduler is not told that length. The loop calibrates its cost model online, as a worker does.
The simulator then replays the identical requests and arrival times with the cost model the run
started from, so ``sim_vs_real_error`` measures the simulator, not the workload.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from bench.scheduling_calibration import TimedEngine
from bench.scheduling_sim import Variant, by_class, lowest_class_p99
from bench.scheduling_workloads import Example
from core.scheduling.cost import StepCostModel
from core.scheduling.predictor import LengthPredictor
from core.scheduling.simulator import RequestOutcome, SimRequest


@dataclass
class RealRun:
    outcomes: list[RequestOutcome]
    log: list[tuple[int, int, int, int, float]]
    """Per iteration: decode rows, window, prefill rows, longest prefill, engine seconds."""
    online_accuracy: float
    final_cost: StepCostModel
    """The loop's online calibration at the end of the run."""


def run_real(engine: Any, requests: list[SimRequest], examples: dict[str, Example], variant: Variant,
             cost: StepCostModel, predictor: LengthPredictor) -> RealRun:
    """Serve ``requests`` through ServingLoop with wall-clock arrivals."""
    from workers.engines.base import SamplingParams
    from workers.serving import FinalEvent, ServeRequest, ServingConfig, ServingLoop

    timed = TimedEngine(engine)
    pred = copy.deepcopy(predictor)
    loop = ServingLoop(timed, pred, ServingConfig(policy=variant.policy, scheduler=variant.config,
                                                  clamp_prediction_to_max_tokens=False), cost)
    pending = sorted(requests, key=lambda r: r.arrival_s)
    t0 = time.monotonic() + 0.05
    finals: dict[str, FinalEvent] = {}
    nxt = 0
    while len(finals) < len(pending):
        now = time.monotonic()
        while nxt < len(pending) and t0 + pending[nxt].arrival_s <= now:
            r = pending[nxt]
            loop.admit(ServeRequest(r.request_id, r.prompt, SamplingParams(max_tokens=r.output_tokens, ignore_eos=True),
                                    slo_s=r.deadline_s - r.arrival_s, slo_class=r.slo_class,
                                    arrival_s=t0 + r.arrival_s, prompt_ids=examples[r.request_id].prompt_ids))
            nxt += 1
        if loop.has_work():
            for ev in loop.step():
                if isinstance(ev, FinalEvent):
                    finals[ev.request_id] = ev
        elif nxt < len(pending):
            time.sleep(max(0.0, t0 + pending[nxt].arrival_s - time.monotonic()))
    by_id = {r.request_id: r for r in requests}
    verdict = {"rejected": "reject", "rerouted": "reroute"}
    outcomes = []
    for rid, f in finals.items():
        src = by_id[rid]
        outcomes.append(RequestOutcome(rid, src.arrival_s, src.arrival_s + f.first_token_s, src.arrival_s + f.total_s,
                                       f.output_tokens, src.deadline_s, src.slo_class,
                                       verdict=verdict.get(f.finish_reason, "shorten" if f.note else ""),
                                       preemptions=f.preemptions))
    return RealRun(outcomes, timed.log, pred.accuracy, loop.scheduler.cost)


def iteration_error(log: list[tuple[int, int, int, int, float]], cost: StepCostModel) -> dict[str, float]:
    """How well a cost model predicts a run's own iterations (engine time only)."""
    if not log:
        return {}
    pred = np.asarray([cost.iteration_s(d, w, p, n) - cost.overhead_s for d, w, p, n, _ in log])
    real = np.asarray([secs for *_, secs in log])
    return {"median_rel_error": float(np.median(np.abs(pred - real) / real)),
            "total_real_over_predicted": float(real.sum() / pred.sum())}


def describe(outcomes: list[RequestOutcome]) -> dict[str, Any]:
    from bench.scheduling_sim import metrics_row
    from core.scheduling.simulator import summarize

    row = metrics_row([summarize(outcomes)], [lowest_class_p99(outcomes)])
    row["by_class"] = by_class(outcomes)
    return row
