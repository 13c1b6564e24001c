"""From ratings to a routed model: the expected-quality mapping and the budget rule.

**Rating -> expected quality.** ELO scores are not on the quality scale, so the rule needed
for RouterBench's ``argmax lambda * quality - cost`` must map them first. With draws counted as
half a win, the expected score of ``m`` against ``o`` equals ``0.5 + 0.5 * (q_m - q_o)`` when
``q`` is the probability of a good answer (win = m good and o bad, draw = both the same).
Averaging over the pool (the n candidates) and solving for ``q_m`` gives

    q_m = q_pool + 2 * (n - 1) / n * (mean_o E(S_m, S_o) - 0.5)

where ``q_pool`` is the pool's mean quality (``pool_quality``; pairwise feedback cannot reveal it,
and it cannot change a decision because it shifts every model equally). For two models this is
``q_strong - q_weak = 2 E - 1``: the mapping is exact, not fitted, and uses no held-out data.

**Budget rule.** Models without a live worker are skipped. Among the live ones whose estimated
cost fits ``budget_usd`` pick ``argmax lambda * q - cost`` (``lambda`` = willingness to pay, USD per
unit of quality); with no ``lambda``, the best quality. Ties go to the cheaper model, then the
name. If no live model fits the budget, the cheapest live model is chosen and the reason says
so. Fallbacks are the other live models in the same preference order (within budget first).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

from core.errors import RetriableError
from core.routing.elo import expected_score


class NoLiveModelError(RetriableError):
    """No candidate has a healthy worker; retry once a worker heart-beats again."""


def expected_quality(
    scores: Mapping[str, float], scale: float = 400.0, pool_quality: float = 0.5
) -> dict[str, float]:
    """Map ratings to expected quality against the pool of ``scores``' models (see module doc)."""
    names = list(scores)
    n = len(names)
    if n == 1:
        return {names[0]: pool_quality}
    out: dict[str, float] = {}
    for m in names:
        mean_e = sum(expected_score(scores[m], scores[o], scale) for o in names if o != m) / (n - 1)
        out[m] = pool_quality + 2.0 * (n - 1) / n * (mean_e - 0.5)
    return out


@dataclass(frozen=True)
class RouteChoice:
    """A routing decision with everything needed to explain and replay it."""

    model: str
    scores: dict[str, float]
    """Every candidate's combined Eagle score (rating scale)."""
    expected_quality: dict[str, float]
    costs: dict[str, float]
    """Every candidate's estimated USD cost for this request."""
    fallbacks: tuple[str, ...]
    """Other live candidates, most preferred first."""
    reason: str
    global_scores: dict[str, float] = field(default_factory=dict)
    """Every candidate's global rating, from the same ranking pass (for the decision record)."""
    local_scores: dict[str, float] = field(default_factory=dict)
    """Every candidate's local rating, from the same ranking pass."""
    exploratory: bool = False
    """True when an exploration draw chose another model than the greedy rule would have."""


def choose(
    quality: Mapping[str, float],
    costs: Mapping[str, float],
    budget_usd: float | None,
    willingness_to_pay: float | None,
    live_models: Collection[str],
) -> tuple[str, tuple[str, ...], str]:
    """(chosen model, fallbacks, reason) by the budget rule; raises when nothing is live."""
    if set(quality) != set(costs):
        raise ValueError(f"quality and costs name different models: {sorted(quality)} vs {sorted(costs)}")
    if budget_usd is not None and budget_usd < 0:
        raise ValueError(f"budget_usd must be >= 0, got {budget_usd}")
    if willingness_to_pay is not None and willingness_to_pay < 0:
        raise ValueError(f"willingness_to_pay must be >= 0, got {willingness_to_pay}")
    names = sorted(quality)
    live = [m for m in names if m in live_models]
    skipped = [m for m in names if m not in live_models]
    if not live:
        raise NoLiveModelError(f"no live worker for any candidate {names}")

    def value(m: str) -> float:
        if willingness_to_pay is None:
            return quality[m]
        return willingness_to_pay * quality[m] - costs[m]

    fits = [m for m in live if budget_usd is None or costs[m] <= budget_usd]
    over = sorted((m for m in live if m not in fits), key=lambda m: (costs[m], m))
    ranked = sorted(fits, key=lambda m: (-value(m), costs[m], m)) + over
    if fits:
        reason = "best within budget" if willingness_to_pay is None else (
            f"best value within budget at willingness to pay ${willingness_to_pay:g}/quality")
    else:
        reason = f"cheapest: no model fits budget ${budget_usd:g}"
    if skipped:
        reason += "; " + "; ".join(f"skipped {m}: no live worker" for m in skipped)
    return ranked[0], tuple(ranked[1:]), reason
