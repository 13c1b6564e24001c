"""Feedback -> comparisons: the documented rules that turn user signals into ELO games.

Three kinds of feedback reach the router (docs/ROUTING.md has the rationale):

* **pairwise** (two answers, the user picks one or calls a tie): one full game.
* **graded** (several models scored on the same prompt, e.g. correctness or a 1-10 judge):
  a round-robin over every pair, in sorted-name order; the higher score wins, scores within
  ``tie_margin`` of each other draw. With n models that is n(n-1)/2 full games.
* **thumbs** (one model's answer rated up or down): the model plays every other model of the
  pool with S = 1 (up) or 0 (down), each leg weighted 1/(n-1). Summed over the legs, the rated
  model moves by ``K * (S - mean expected score against the pool)``: one game against the pool
  average, i.e. "thumbs against the model's expected score". Each opponent moves by its leg's
  share, so the rating total is conserved as in every ELO game.

The local-quality ranker (``local_quality.py``) consumes :class:`Observation`s instead of games:
one model's outcome on a prompt, in [0, 1], with a weight (``observations_from_graded`` turns
graded scores into one observation per model).

All functions are pure: the same inputs give the same comparisons in the same order, which is
what makes the ratings a pure function of the ordered feedback stream.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from core.routing.elo import DRAW, LOSS, WIN, Comparison

PairOutcome = Literal["a", "b", "tie"]


def from_pairwise(model_a: str, model_b: str, winner: PairOutcome) -> tuple[Comparison, ...]:
    """One full game from an explicit preference between ``model_a`` and ``model_b``."""
    scores = {"a": WIN, "b": LOSS, "tie": DRAW}
    if winner not in scores:
        raise ValueError(f"winner must be 'a', 'b' or 'tie', got {winner!r}")
    return (Comparison(model_a, model_b, scores[winner]),)


def from_graded(scores: Mapping[str, float], tie_margin: float = 0.0) -> tuple[Comparison, ...]:
    """Round-robin games among the models scored on one prompt (sorted-name order)."""
    if tie_margin < 0:
        raise ValueError(f"tie_margin must be >= 0, got {tie_margin}")
    names = sorted(scores)
    games: list[Comparison] = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            diff = scores[a] - scores[b]
            outcome = DRAW if abs(diff) <= tie_margin else (WIN if diff > 0 else LOSS)
            games.append(Comparison(a, b, outcome))
    return tuple(games)


def from_thumbs(model: str, up: bool, pool: Sequence[str]) -> tuple[Comparison, ...]:
    """Legs of one game against the pool average (empty when the pool has no other model).

    ``pool`` is the set of models the router rates when the vote is applied (for replayability
    it must itself be a function of the stream, e.g. ``EagleRanker.models``).
    """
    opponents = sorted(set(pool) - {model})
    if not opponents:
        return ()
    weight = 1.0 / len(opponents)
    outcome = WIN if up else LOSS
    return tuple(Comparison(model, other, outcome, weight) for other in opponents)


@dataclass(frozen=True)
class FeedbackItem:
    """One feedback event as the ranker consumes it.

    The prompt is identified by ``prompt_key``; ``embedding`` may be omitted when an earlier
    item (or :meth:`NeighbourIndex.add`) already registered that key's vector. Several items may
    share a key: their comparisons accumulate under that prompt in stream order.
    """

    feedback_id: str
    prompt_key: str
    comparisons: tuple[Comparison, ...]
    embedding: np.ndarray | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not self.feedback_id:
            raise ValueError("feedback_id must be non-empty")
        if not self.prompt_key:
            raise ValueError("prompt_key must be non-empty")


@dataclass(frozen=True)
class Observation:
    """How one model did on one prompt: ``outcome`` in [0, 1] (1 = good answer), with a weight."""

    model: str
    outcome: float
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("an observation needs a model")
        if not 0.0 <= self.outcome <= 1.0 or np.isnan(self.outcome):
            raise ValueError(f"outcome must be within [0, 1], got {self.outcome}")
        if not 0.0 < self.weight <= 1.0:
            raise ValueError(f"weight must be within (0, 1], got {self.weight}")


def observations_from_graded(scores: Mapping[str, float]) -> tuple[Observation, ...]:
    """One observation per scored model (scores in [0, 1]), in sorted-name order."""
    return tuple(Observation(m, float(scores[m])) for m in sorted(scores))


@dataclass(frozen=True)
class ObservationItem:
    """One feedback event as the local-quality ranker consumes it (see :class:`FeedbackItem`)."""

    feedback_id: str
    prompt_key: str
    observations: tuple[Observation, ...]
    embedding: np.ndarray | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not self.feedback_id:
            raise ValueError("feedback_id must be non-empty")
        if not self.prompt_key:
            raise ValueError("prompt_key must be non-empty")
