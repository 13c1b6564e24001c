"""Routing: local-quality (default) and Eagle rankers, feedback rules, budget rule, NN index.

Pure module: no Kafka, faust or database imports. The router agent builds a ``RouterState``
(``state.py``) around a :class:`LocalQualityRanker` or an :class:`EagleRanker`, feeds it feedback
in stream order and calls ``route``.
"""

from core.routing.budget import NoLiveModelError, RouteChoice, choose, expected_quality
from core.routing.eagle import EagleConfig, EagleRanker
from core.routing.elo import Comparison, apply_comparisons, expected_score, update_pair
from core.routing.feedback import (
    FeedbackItem,
    Observation,
    ObservationItem,
    from_graded,
    from_pairwise,
    from_thumbs,
    observations_from_graded,
)
from core.routing.index import NeighbourIndex
from core.routing.local_quality import LocalQualityConfig, LocalQualityRanker, explore_draw

__all__ = [
    "Comparison",
    "EagleConfig",
    "EagleRanker",
    "FeedbackItem",
    "LocalQualityConfig",
    "LocalQualityRanker",
    "NeighbourIndex",
    "NoLiveModelError",
    "Observation",
    "ObservationItem",
    "RouteChoice",
    "apply_comparisons",
    "choose",
    "expected_quality",
    "expected_score",
    "explore_draw",
    "from_graded",
    "from_pairwise",
    "from_thumbs",
    "observations_from_graded",
    "update_pair",
]
