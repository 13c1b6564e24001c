"""The router's whole state as a pure function of the ordered feedback stream.

``RouterState`` wraps one ranker, chosen by the config's type: :class:`LocalQualityRanker`
(``LocalQualityConfig``, the default router) or :class:`EagleRanker` (``EagleConfig``). Both see the
same validation, so the same events are dead-lettered whichever ranker runs.

For the local-quality ranker every event becomes observations of how a model did:

* ``pairwise`` a vs b: a observed at 1 / 0 / 0.5 (a wins / b wins / tie), b at the complement.
* ``rating`` r of model m: m observed at r.   ``thumbs`` up/down of m: m observed at 1 / 0.
* ``implicit``: ``accept`` = m at 1, weight 0.5; ``regenerate`` = m at 0, weight 0.5; ``edit`` = m
  at 0, weight 0.25; ``dwell`` is engagement, not quality, and observes nothing.

For Eagle, events become ELO games:

* ``pairwise`` (a vs b)           -> one game (``from_pairwise``).
* ``rating`` r in [0, 1] of model m on prompt p
    - when other models were rated on the same prompt before: m plays each of them once, the
      higher rating winning (``from_graded``, round robin restricted to the new model's games, so
      no pair is counted twice);
    - otherwise: one game against the pool average with score r (the thumbs rule below with a
      graded outcome), i.e. "rated against the model's expected score".
* ``thumbs`` up/down of model m   -> one game against the pool average with S = 1 / 0
  (``from_thumbs``: legs against every other pool model, each weighted 1/(n-1)).
* ``implicit``: ``accept`` = thumbs up at half weight, ``regenerate`` = thumbs down at half
  weight, ``edit`` = thumbs down at quarter weight (the answer was kept but needed fixing);
  ``dwell`` is engagement, not quality, and produces no game.

The pool is the configured catalogue plus every model seen in feedback, sorted, so it is itself a
function of configuration and stream. Prompts are keyed by ``prompt_key`` (the agent uses a hash
of the normalised prompt text, so repeated prompts share their history).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from core.errors import ValidationError
from core.routing.eagle import EagleConfig, EagleRanker
from core.routing.elo import Comparison
from core.routing.feedback import (
    FeedbackItem,
    Observation,
    ObservationItem,
    from_graded,
    from_pairwise,
    from_thumbs,
)
from core.routing.index import NeighbourIndex
from core.routing.local_quality import LocalQualityConfig, LocalQualityRanker

IMPLICIT_WEIGHT = {"accept": (True, 0.5), "regenerate": (False, 0.5), "edit": (False, 0.25)}


@dataclass(frozen=True)
class RouterFeedback:
    """The parts of a Feedback event the router uses (JSON-serialisable for its journal)."""

    feedback_id: str
    prompt_key: str
    kind: str
    model: str | None = None
    rating: float | None = None
    thumbs_up: bool | None = None
    model_a: str | None = None
    model_b: str | None = None
    winner: str | None = None
    signal: str | None = None

    @classmethod
    def from_event(cls, event: Mapping[str, Any], prompt_key: str) -> RouterFeedback:
        pair = event.get("pairwise") or {}
        implicit = event.get("implicit") or {}
        return cls(feedback_id=event["event_id"], prompt_key=prompt_key, kind=event["kind"], model=event.get("model"),
                   rating=event.get("rating"), thumbs_up=event.get("thumbs_up"), model_a=pair.get("model_a"),
                   model_b=pair.get("model_b"), winner=pair.get("winner"), signal=implicit.get("signal"))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


RouterConfig = EagleConfig | LocalQualityConfig
Ranker = EagleRanker | LocalQualityRanker
PAIR_OUTCOME = {"a": 1.0, "b": 0.0, "tie": 0.5}


def algorithm_of(config: RouterConfig) -> str:
    """The router's name on the wire and in its journal: ``local_quality`` or ``eagle``."""
    return "eagle" if isinstance(config, EagleConfig) else "local_quality"


class RouterState:
    def __init__(self, config: RouterConfig, pool: Sequence[str], index: NeighbourIndex | None = None) -> None:
        self.base_pool = tuple(sorted(pool))
        self.ranker: Ranker = (EagleRanker(config, index) if isinstance(config, EagleConfig)
                               else LocalQualityRanker(config, index))
        if isinstance(self.ranker, LocalQualityRanker):
            self.ranker.add_models(self.base_pool)  # catalogue columns first: a function of configuration
        self.graded: dict[str, dict[str, float]] = {}

    @property
    def algorithm(self) -> str:
        return algorithm_of(self.ranker.config)

    def observations(self, fb: RouterFeedback) -> tuple[Observation, ...]:
        """How each model named by one feedback event did (validates like ``comparisons``)."""
        self.comparisons(fb)
        if fb.kind == "pairwise":
            if fb.model_a == fb.model_b:
                return ()
            score = PAIR_OUTCOME[str(fb.winner)]
            return (Observation(str(fb.model_a), score), Observation(str(fb.model_b), 1.0 - score))
        assert fb.model is not None
        if fb.kind == "thumbs":
            return (Observation(fb.model, 1.0 if fb.thumbs_up else 0.0),)
        if fb.kind == "rating":
            assert fb.rating is not None
            return (Observation(fb.model, float(fb.rating)),)
        if fb.signal == "dwell":
            return ()
        up, weight = IMPLICIT_WEIGHT[str(fb.signal)]
        return (Observation(fb.model, 1.0 if up else 0.0, weight),)

    def pool(self) -> list[str]:
        return sorted(set(self.base_pool) | set(self.ranker.models))

    def comparisons(self, fb: RouterFeedback) -> tuple[Comparison, ...]:
        """The games one feedback event implies, given the state so far (does not change it)."""
        if fb.kind == "pairwise":
            if not (fb.model_a and fb.model_b and fb.winner):
                raise ValidationError("pairwise feedback needs model_a, model_b and winner")
            if fb.winner not in PAIR_OUTCOME:
                raise ValidationError(f"pairwise winner must be 'a', 'b' or 'tie', got {fb.winner!r}")
            if fb.model_a == fb.model_b:
                return ()  # the same model against itself carries no ranking information
            return from_pairwise(fb.model_a, fb.model_b, fb.winner)  # type: ignore[arg-type]
        if not fb.model:
            raise ValidationError(f"{fb.kind} feedback does not name the model that answered")
        if fb.kind == "thumbs":
            if fb.thumbs_up is None:
                raise ValidationError("thumbs feedback without thumbs_up")
            return from_thumbs(fb.model, fb.thumbs_up, self.pool())
        if fb.kind == "rating":
            if fb.rating is None or not 0.0 <= fb.rating <= 1.0:
                raise ValidationError(f"rating must be in [0, 1], got {fb.rating!r}")
            peers = {m: r for m, r in self.graded.get(fb.prompt_key, {}).items() if m != fb.model}
            if peers:
                return tuple(c for c in from_graded({fb.model: fb.rating, **peers})
                             if fb.model in (c.a, c.b))
            return tuple(Comparison(c.a, c.b, fb.rating, c.weight)
                         for c in from_thumbs(fb.model, True, self.pool()))
        if fb.kind == "implicit":
            if fb.signal == "dwell":
                return ()
            if fb.signal not in IMPLICIT_WEIGHT:
                raise ValidationError(f"unknown implicit signal {fb.signal!r}")
            up, weight = IMPLICIT_WEIGHT[fb.signal]
            return tuple(Comparison(c.a, c.b, c.score_a, c.weight * weight)
                         for c in from_thumbs(fb.model, up, self.pool()))
        raise ValidationError(f"unknown feedback kind {fb.kind!r}")

    def apply(self, fb: RouterFeedback, embedding: np.ndarray | None) -> tuple[Any, ...]:
        """Apply one feedback event (in stream order); return what it produced for the ranker:
        ``Comparison``s for Eagle, ``Observation``s for local quality."""
        if isinstance(self.ranker, LocalQualityRanker):
            observed = self.observations(fb)
            self.ranker.apply(ObservationItem(fb.feedback_id, fb.prompt_key, observed, embedding))
            return observed
        games = self.comparisons(fb)
        if fb.kind == "rating" and fb.model is not None and fb.rating is not None:
            self.graded.setdefault(fb.prompt_key, {})[fb.model] = fb.rating
        self.ranker.apply(FeedbackItem(fb.feedback_id, fb.prompt_key, games, embedding))
        return games

    def snapshot(self) -> dict[str, Any]:
        return {"algorithm": self.algorithm, "ranker": self.ranker.snapshot(), "graded": self.graded,
                "pool": list(self.base_pool)}

    @classmethod
    def from_snapshot(cls, data: Mapping[str, Any], index: NeighbourIndex | None = None) -> RouterState:
        algorithm = data.get("algorithm", "eagle")  # snapshots before the default changed are Eagle's
        if algorithm == "eagle":
            state = cls(EagleConfig(**data["ranker"]["config"]), data["pool"], index)
            state.ranker = EagleRanker.from_snapshot(data["ranker"], state.ranker.index)
        elif algorithm == "local_quality":
            state = cls(LocalQualityConfig(**data["ranker"]["config"]), data["pool"], index)
            state.ranker = LocalQualityRanker.from_snapshot(data["ranker"], state.ranker.index)
        else:
            raise ValueError(f"unknown router algorithm {algorithm!r} in snapshot")
        state.graded = {k: dict(v) for k, v in data["graded"].items()}
        return state
