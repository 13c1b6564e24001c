"""Admission control's reroute: hand a routing decision to a cheaper model that can still make it.

A worker whose scheduler finds a request hopeless (``core.scheduling.goodput``) forwards the
decision to the cheapest *live* candidate of the original decision that costs less per token; the
request keeps its event time, so its deadline does not move, and its metadata records where it
came from and why, which the cheaper model's final response repeats in ``admission``.
"""

from __future__ import annotations

from typing import Any

from core.catalog import CATALOG
from streams.events import envelope

REROUTED_FROM = "flywheel.rerouted_from"
"""Request metadata: the model that handed the request on (a request is rerouted at most once)."""
REROUTE_REASON = "flywheel.reroute_reason"


def reroute_target(decision: dict[str, Any], model: str) -> str | None:
    """The cheapest live candidate of a decision that is cheaper than ``model`` (None: no such)."""
    if decision["request"].get("metadata", {}).get(REROUTED_FROM):
        return None
    price = CATALOG[model].price_out_per_mtok if model in CATALOG else 0.0
    cheaper = [c["model"] for c in decision.get("candidates", [])
               if c.get("live") and c["model"] != model and c["model"] in CATALOG
               and CATALOG[c["model"]].price_out_per_mtok < price and c.get("within_budget", True)]
    return min(cheaper, key=lambda m: CATALOG[m].price_out_per_mtok) if cheaper else None


def rerouted_decision(decision: dict[str, Any], target: str, reason: str, worker_id: str) -> dict[str, Any]:
    """The routing decision handed to ``target``; the request keeps its event time (and deadline)."""
    request = decision["request"]
    metadata = {**request.get("metadata", {}), REROUTED_FROM: decision["model"], REROUTE_REASON: reason}
    return {**decision, **envelope(request["request_id"], request["tenant_id"], request["user_id"]),
            "request": {**request, "metadata": metadata}, "model": target,
            "reason": f"rerouted by {worker_id}: {reason}"[:500]}
