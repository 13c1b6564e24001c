"""Eagle routing: ELO maths, global + local ranking, feedback rules, budget rule, NN index.

Pure module: no Kafka, faust or database imports. The router agent builds an
:class:`EagleRanker`, feeds it :class:`FeedbackItem`s in stream order and calls ``route``.
"""

from core.routing.budget import NoLiveModelError, RouteChoice, choose, expected_quality
from core.routing.eagle import EagleConfig, EagleRanker
from core.routing.elo import Comparison, apply_comparisons, expected_score, update_pair
from core.routing.feedback import FeedbackItem, from_graded, from_pairwise, from_thumbs
from core.routing.index import NeighbourIndex

__all__ = [
    "Comparison",
    "EagleConfig",
    "EagleRanker",
    "FeedbackItem",
    "NeighbourIndex",
    "NoLiveModelError",
    "RouteChoice",
    "apply_comparisons",
    "choose",
    "expected_quality",
    "expected_score",
    "from_graded",
    "from_pairwise",
    "from_thumbs",
    "update_pair",
]
