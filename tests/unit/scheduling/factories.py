"""Factories for scheduler tests: hand-built requests and a driver that plays the engine."""

from __future__ import annotations

import math

from core.scheduling.cost import StepCostModel
from core.scheduling.policies import Plan, Scheduler, StepResult
from core.scheduling.state import SchedRequest

# 10 ms per decode step plus 1 ms per row; prefill 5 ms + 0.01 ms per padded token.
COST = StepCostModel(0.010, 0.001, 0.0, 0.005, 0.00001)


def make_request(
    rid: str,
    arrival: float = 0.0,
    predicted: float = 10.0,
    prompt: int = 8,
    deadline: float = math.inf,
    max_tokens: int = 1000,
) -> SchedRequest:
    return SchedRequest(
        request_id=rid,
        arrival_s=arrival,
        prompt_tokens=prompt,
        predicted_tokens=predicted,
        max_tokens=max_tokens,
        deadline_s=deadline,
    )


def step(s: Scheduler, now: float, lengths: dict[str, int]) -> tuple[Plan, list[str]]:
    """One iteration where request ``rid`` finishes after ``lengths[rid]`` tokens."""
    plan = s.schedule(now)
    results = {}
    for rid in plan.batch:
        req = s.get(rid)
        assert req is not None
        if req.generated < lengths[rid]:
            results[rid] = StepResult(1, req.generated + 1 >= lengths[rid])
        else:
            results[rid] = StepResult(0, True)
    done = s.update(plan, results, now)
    return plan, [r.request_id for r in done]
