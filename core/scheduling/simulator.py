"""Discrete-event simulation of an iteration-level engine driven by a real scheduling policy.

The simulator replays exactly what the serving loop does (admit arrivals -> ``schedule`` ->
execute -> ``update``), with the engine replaced by a calibrated ``StepCostModel`` and the
output lengths known in advance. Events are arrivals and iteration ends; the clock jumps to the
next arrival whenever nothing can run. Invariants mirrored from the torch engine:

* a joining row's iteration is its prefill, which yields its first token;
* every row in ``Plan.batch`` computes (a static batch's finished rows are padding);
* the decode window is the largest context among the decoding rows, and a row's context grows
  by one for every iteration it takes part in, padding or not.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from core.scheduling.cost import StepCostModel
from core.scheduling.policies import Scheduler, StepResult
from core.scheduling.state import SchedRequest


@dataclass(frozen=True)
class SimRequest:
    request_id: str
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    """True output length (the engine stops the request after this many tokens)."""
    deadline_s: float = math.inf
    slo_class: str = ""
    prompt: str = ""
    """Prompt text, for the length predictor."""


@dataclass(frozen=True)
class RequestOutcome:
    request_id: str
    arrival_s: float
    first_token_s: float
    finish_s: float
    output_tokens: int
    deadline_s: float = math.inf
    slo_class: str = ""

    @property
    def latency_s(self) -> float:
        return self.finish_s - self.arrival_s

    @property
    def met_slo(self) -> bool:
        return self.finish_s <= self.deadline_s


@dataclass(frozen=True)
class Metrics:
    mean_latency_s: float
    p99_latency_s: float
    slo_attainment: float
    """Share of requests finished by their deadline (requests without a deadline count as met)."""
    tokens_per_s: float
    """Output tokens over the makespan (first arrival to last completion)."""
    makespan_s: float
    n: int

    def as_dict(self) -> dict[str, float]:
        return {"mean_latency_s": self.mean_latency_s, "p99_latency_s": self.p99_latency_s,
                "slo_attainment": self.slo_attainment, "tokens_per_s": self.tokens_per_s,
                "makespan_s": self.makespan_s, "n": float(self.n)}


def summarize(outcomes: Sequence[RequestOutcome]) -> Metrics:
    if not outcomes:
        raise ValueError("summarize() needs at least one outcome")
    lat = np.asarray([o.latency_s for o in outcomes])
    start = min(o.arrival_s for o in outcomes)
    end = max(o.finish_s for o in outcomes)
    span = max(end - start, 1e-9)
    return Metrics(
        mean_latency_s=float(lat.mean()),
        p99_latency_s=float(np.percentile(lat, 99)),
        slo_attainment=float(np.mean([o.met_slo for o in outcomes])),
        tokens_per_s=float(sum(o.output_tokens for o in outcomes) / span),
        makespan_s=float(span),
        n=len(outcomes),
    )


def simulate(
    requests: Sequence[SimRequest],
    scheduler: Scheduler,
    cost: StepCostModel,
    *,
    predict: Callable[[SimRequest], float],
    observe: Callable[[SimRequest], None] | None = None,
    max_tokens: int | None = None,
) -> list[RequestOutcome]:
    """Run every request to completion; returns outcomes in completion order.

    ``predict`` gives the length estimate the policy sees at arrival; ``observe`` is called
    when a request completes (the online predictor learns there, as in the serving loop).
    """
    if not requests:
        return []
    pending = sorted(requests, key=lambda r: (r.arrival_s, r.request_id))
    by_id = {r.request_id: r for r in pending}
    if len(by_id) != len(pending):
        raise ValueError("request ids must be unique")
    steps: dict[str, int] = {}  # iterations each row took part in (its KV context = prompt + steps)
    first: dict[str, float] = {}
    outcomes: list[RequestOutcome] = []
    now = pending[0].arrival_s
    nxt = 0
    while len(outcomes) < len(pending):
        while nxt < len(pending) and pending[nxt].arrival_s <= now:
            r = pending[nxt]
            cap = max_tokens if max_tokens is not None else max(r.output_tokens, 1)
            scheduler.add(SchedRequest(
                request_id=r.request_id, arrival_s=r.arrival_s, prompt_tokens=r.prompt_tokens,
                predicted_tokens=max(float(predict(r)), 1.0), max_tokens=cap,
                deadline_s=r.deadline_s, slo_class=r.slo_class,
            ))
            nxt += 1
        plan = scheduler.schedule(now)
        if plan.is_empty:
            if nxt >= len(pending):
                raise RuntimeError(f"{scheduler.name} scheduled nothing with {scheduler.num_waiting} waiting")
            now = max(now, pending[nxt].arrival_s)
            continue
        joining = set(plan.admitted)
        decoding = [rid for rid in plan.batch if rid not in joining]
        window = max((by_id[rid].prompt_tokens + steps[rid] for rid in decoding), default=0)
        max_prompt = max((by_id[rid].prompt_tokens for rid in plan.admitted), default=0)
        now += cost.iteration_s(len(decoding), window, len(plan.admitted), max_prompt)
        results: dict[str, StepResult] = {}
        for rid in plan.batch:
            steps[rid] = steps.get(rid, 0) + 1
            req = scheduler.get(rid)
            assert req is not None
            if rid in joining:
                first[rid] = now
            target = by_id[rid].output_tokens
            if req.generated < target:
                results[rid] = StepResult(new_tokens=1, finished=req.generated + 1 >= target)
            else:  # a finished row kept as padding by a static batch
                results[rid] = StepResult(new_tokens=0, finished=True)
        for req in scheduler.update(plan, results, now):
            src = by_id[req.request_id]
            outcomes.append(RequestOutcome(
                request_id=src.request_id, arrival_s=src.arrival_s, first_token_s=first[src.request_id],
                finish_s=now, output_tokens=req.generated, deadline_s=src.deadline_s, slo_class=src.slo_class,
            ))
            if observe is not None:
                observe(src)
    return outcomes
