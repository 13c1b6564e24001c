"""Service-level objectives: when a request's final answer is due.

A request may carry an absolute ``deadline``; otherwise its SLO class sets the target measured
from the request's event time. The worker's scheduler orders by it and every reporter (worker
metrics, gateway dashboard, demo) judges attainment by the same rule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from core.scheduling.cost import StepCostModel

SLO_SECONDS = {"interactive": 20.0, "standard": 60.0, "batch": 600.0}
"""Completion targets per SLO class, from the request's event time."""


def _epoch_ms(value: Any) -> int:
    return value if isinstance(value, int) else int(value.timestamp() * 1000)


def deadline_ms(request: dict[str, Any]) -> int:
    """Epoch milliseconds by which the request's final response is due."""
    if request.get("deadline") is not None:
        return _epoch_ms(request["deadline"])
    return _epoch_ms(request["event_time"]) + int(SLO_SECONDS.get(request.get("slo_class", "standard"), 60.0) * 1000)


# --- The router's SLO check --------------------------------------------------------------------
# Workers publish their online-calibrated step costs, their backlog and their recent output lengths
# in heartbeats; the router predicts, per live model, when a new request would finish there and
# prefers the models that meet its deadline (the ranking still decides among them).

CHARS_PER_TOKEN = 4.0
"""English text in a BPE tokenizer: about four characters per token (an estimate, not a bound)."""


@dataclass(frozen=True)
class WorkerLoad:
    """A worker's speed and queue as its last heartbeat described them."""

    model: str
    cost: StepCostModel
    running: int
    max_batch: int
    backlog_s: float
    """Predicted seconds before a request arriving now could join the batch."""
    mean_output_tokens: float
    """Recent answers' mean length (0 = unknown)."""
    seen_s: float
    """When the heartbeat was produced (epoch seconds)."""

    @classmethod
    def from_heartbeat(cls, event: dict[str, Any], seen_s: float) -> WorkerLoad | None:
        """None for heartbeats without a calibrated cost model (older workers)."""
        cost = event.get("step_cost")
        if not cost:
            return None
        model = StepCostModel(cost["decode_base_s"], cost["decode_per_row_s"], cost["decode_per_cell_s"],
                              cost["prefill_base_s"], cost["prefill_per_token_s"], cost["overhead_s"])
        return cls(event["model"], model, int(event["running"]), max(int(event.get("max_batch", 32)), 1),
                   max(float(event.get("backlog_s", 0.0)), 0.0), float(event.get("mean_output_tokens", 0.0)),
                   seen_s)

    def completion_s(self, prompt_tokens: float, max_tokens: int) -> float:
        """Predicted seconds from now until a new request's final answer at this worker."""
        out = min(float(max_tokens), self.mean_output_tokens) if self.mean_output_tokens > 0 else float(max_tokens)
        rows = min(self.running + 1, self.max_batch)
        window = int(prompt_tokens + out)
        return (self.backlog_s + self.cost.prefill_s(1, int(prompt_tokens))
                + max(out - 1.0, 0.0) * self.cost.per_token_s(rows, window))


@dataclass
class SloCheck:
    """Folds heartbeats; tells which live models are predicted to meet a request's deadline."""

    stale_s: float = 10.0
    loads: dict[str, WorkerLoad] = field(default_factory=dict)
    """Latest load per worker id."""

    def on_heartbeat(self, event: dict[str, Any], seen_s: float) -> None:
        load = WorkerLoad.from_heartbeat(event, seen_s)
        if load is None or not event.get("healthy", True):
            self.loads.pop(event["worker_id"], None)
        else:
            self.loads[event["worker_id"]] = load

    def predicted_s(self, request: dict[str, Any], now_s: float) -> dict[str, float]:
        """Best predicted completion (seconds from now) per model with a fresh, calibrated worker."""
        chars = len(request.get("prompt") or "") + sum(len(m["content"]) for m in request.get("messages") or [])
        prompt_tokens = chars / CHARS_PER_TOKEN + 8
        best: dict[str, float] = {}
        for load in self.loads.values():
            if now_s - load.seen_s > self.stale_s:
                continue
            t = load.completion_s(prompt_tokens, int(request["max_tokens"]))
            best[load.model] = min(t, best.get(load.model, math.inf))
        return best

    def prefer_feasible(self, live: set[str], request: dict[str, Any], now_s: float) -> tuple[set[str], str]:
        """The live models predicted to meet the deadline, if any is (else ``live`` unchanged), and a
        note for the decision's reason ("" when the check changed nothing)."""
        budget = deadline_ms(request) / 1000.0 - now_s
        predicted = self.predicted_s(request, now_s)
        known = {m: t for m, t in predicted.items() if m in live}
        feasible = {m for m, t in known.items() if t <= budget}
        keep = feasible | (live - set(known))  # a model without a calibrated worker cannot be judged
        if not feasible or keep == live:
            return live, ""
        dropped = sorted(live - keep)
        return keep, ("slo: " + ", ".join(f"{m} predicted {known[m]:.1f}s > {max(budget, 0):.1f}s"
                                          for m in dropped))
