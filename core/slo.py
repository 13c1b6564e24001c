"""Service-level objectives: when a request's final answer is due.

A request may carry an absolute ``deadline``; otherwise its SLO class sets the target measured
from the request's event time. The worker's scheduler orders by it and every reporter (worker
metrics, gateway dashboard, demo) judges attainment by the same rule.
"""

from __future__ import annotations

from typing import Any

SLO_SECONDS = {"interactive": 20.0, "standard": 60.0, "batch": 600.0}
"""Completion targets per SLO class, from the request's event time."""


def _epoch_ms(value: Any) -> int:
    return value if isinstance(value, int) else int(value.timestamp() * 1000)


def deadline_ms(request: dict[str, Any]) -> int:
    """Epoch milliseconds by which the request's final response is due."""
    if request.get("deadline") is not None:
        return _epoch_ms(request["deadline"])
    return _epoch_ms(request["event_time"]) + int(SLO_SECONDS.get(request.get("slo_class", "standard"), 60.0) * 1000)
