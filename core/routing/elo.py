"""ELO maths and the comparison record every Eagle rating is built from.

A :class:`Comparison` says that model ``a`` scored ``score_a`` (1 win, 0.5 draw, 0 loss) against
model ``b``; ``weight`` scales the step (thumbs feedback spreads one game over the pool).
The update is the classic one, applied symmetrically so the sum of ratings never changes:

    E_a = 1 / (1 + 10 ** ((R_b - R_a) / scale))
    R_a' = R_a + weight * K * (S_a - E_a)
    R_b' = R_b - weight * K * (S_a - E_a)

Invariants: ratings depend only on the ordered sequence of comparisons (no clocks, no
randomness), and replaying the same sequence from the same start reproduces them bit for bit,
because every step is the same IEEE arithmetic in the same order.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, MutableMapping
from dataclasses import dataclass

WIN = 1.0
DRAW = 0.5
LOSS = 0.0


@dataclass(frozen=True)
class Comparison:
    """One game: ``a`` scored ``score_a`` against ``b``."""

    a: str
    b: str
    score_a: float
    """1.0 if ``a`` won, 0.5 for a draw, 0.0 if ``b`` won (fractions allowed, within [0, 1])."""
    weight: float = 1.0
    """Multiplies K for this game; 1 for a full game, 1/(n-1) for each leg of a thumbs vote."""

    def __post_init__(self) -> None:
        if self.a == self.b:
            raise ValueError(f"a comparison needs two different models, got {self.a!r} twice")
        if not 0.0 <= self.score_a <= 1.0 or math.isnan(self.score_a):
            raise ValueError(f"score_a must be within [0, 1], got {self.score_a}")
        if not 0.0 < self.weight <= 1.0:
            raise ValueError(f"weight must be within (0, 1], got {self.weight}")

    def to_json(self) -> list[object]:
        return [self.a, self.b, self.score_a, self.weight]

    @classmethod
    def from_json(cls, value: list[object]) -> Comparison:
        a, b, score, weight = value
        return cls(str(a), str(b), float(score), float(weight))  # type: ignore[arg-type]


def expected_score(rating_a: float, rating_b: float, scale: float = 400.0) -> float:
    """Probability-like expected score of ``a`` against ``b`` (0.5 when the ratings are equal)."""
    return 1.0 / (1.0 + 10.0 ** ((rating_b - rating_a) / scale))


def update_pair(
    rating_a: float, rating_b: float, score_a: float, k: float = 32.0, scale: float = 400.0
) -> tuple[float, float]:
    """New (R_a, R_b) after one game; the total R_a + R_b is unchanged."""
    delta = k * (score_a - expected_score(rating_a, rating_b, scale))
    return rating_a + delta, rating_b - delta


def apply_comparisons(
    ratings: MutableMapping[str, float],
    comparisons: Iterable[Comparison],
    k: float,
    scale: float,
    initial_rating: float,
) -> None:
    """Play ``comparisons`` in order into ``ratings`` in place; new models start at ``initial_rating``."""
    for c in comparisons:
        ra = ratings.get(c.a, initial_rating)
        rb = ratings.get(c.b, initial_rating)
        delta = c.weight * k * (c.score_a - 1.0 / (1.0 + 10.0 ** ((rb - ra) / scale)))
        ratings[c.a] = ra + delta
        ratings[c.b] = rb - delta
