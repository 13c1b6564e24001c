"""Expected-quality mapping and the budget / willingness-to-pay / liveness rule."""

import numpy as np
import pytest

from core.routing.budget import NoLiveModelError, choose, expected_quality
from core.routing.eagle import EagleConfig, EagleRanker
from core.routing.elo import expected_score
from core.routing.feedback import FeedbackItem, from_pairwise
from core.routing.index import NeighbourIndex


def test_two_model_quality_gap_is_twice_the_expected_score_minus_one():
    q = expected_quality({"strong": 1200.0, "weak": 1000.0})
    e = expected_score(1200.0, 1000.0)  # 0.7597469
    assert q["strong"] - q["weak"] == pytest.approx(2 * e - 1)
    assert (q["strong"] + q["weak"]) / 2 == pytest.approx(0.5)


def test_pool_quality_formula_for_three_models():
    scores = {"a": 1100.0, "b": 1000.0, "c": 900.0}
    q = expected_quality(scores, pool_quality=0.6)
    mean_e_a = (expected_score(1100, 1000) + expected_score(1100, 900)) / 2
    assert q["a"] == pytest.approx(0.6 + 2 * 2 / 3 * (mean_e_a - 0.5))
    assert q["b"] == pytest.approx(0.6)  # symmetric middle model sits at the pool mean
    assert sum(q.values()) / 3 == pytest.approx(0.6)
    assert expected_quality({"solo": 1234.0}) == {"solo": 0.5}


QUALITY = {"strong": 0.9, "mid": 0.7, "weak": 0.5}
COSTS = {"strong": 0.010, "mid": 0.002, "weak": 0.0005}
ALL = set(QUALITY)


def test_best_quality_within_budget():
    assert choose(QUALITY, COSTS, None, None, ALL)[0] == "strong"
    model, fallbacks, reason = choose(QUALITY, COSTS, 0.005, None, ALL)
    assert (model, fallbacks) == ("mid", ("weak", "strong"))
    assert reason == "best within budget"


def test_willingness_to_pay_trades_quality_for_cost():
    # lambda = 0.01: values 0.009-0.010=-0.001, 0.007-0.002=0.005, 0.005-0.0005=0.0045 -> mid
    assert choose(QUALITY, COSTS, None, 0.01, ALL)[0] == "mid"
    # lambda = 1: quality dominates -> strong; lambda = 0: cost only -> weak
    assert choose(QUALITY, COSTS, None, 1.0, ALL)[0] == "strong"
    assert choose(QUALITY, COSTS, None, 0.0, ALL)[0] == "weak"


def test_no_model_fits_the_budget_picks_the_cheapest():
    model, fallbacks, reason = choose(QUALITY, COSTS, 0.0001, 1.0, ALL)
    assert model == "weak"
    assert fallbacks == ("mid", "strong")
    assert reason.startswith("cheapest: no model fits budget")


def test_never_routes_to_a_model_without_a_live_worker():
    model, fallbacks, reason = choose(QUALITY, COSTS, None, None, {"mid", "weak"})
    assert model == "mid"
    assert "strong" not in fallbacks
    assert "skipped strong: no live worker" in reason
    with pytest.raises(NoLiveModelError):
        choose(QUALITY, COSTS, None, None, set())
    assert NoLiveModelError("x").retriable


def test_choose_validates_inputs():
    with pytest.raises(ValueError, match="budget_usd"):
        choose(QUALITY, COSTS, -1.0, None, ALL)
    with pytest.raises(ValueError, match="different models"):
        choose(QUALITY, {"strong": 1.0}, None, None, ALL)


def test_ranker_route_skips_dead_best_model_for_next_best():
    ranker = EagleRanker(EagleConfig(neighbours=2), NeighbourIndex(dim=2))
    for i in range(10):
        emb = np.array([1.0, i / 10])
        ranker.apply(FeedbackItem(f"f{i}", f"p{i}", from_pairwise("strong", "weak", "a"), emb))
    query = np.array([1.0, 0.05])
    costs = {"strong": 0.01, "weak": 0.001, "fresh": 0.002}
    choice = ranker.route(query, costs, budget_usd=None, willingness_to_pay=None,
                          live_models={"strong", "weak", "fresh"})
    assert choice.model == "strong"
    assert choice.scores["fresh"] == ranker.config.initial_rating  # never rated
    assert choice.fallbacks[0] == "fresh" and choice.fallbacks[-1] == "weak"
    dead = ranker.route(query, costs, None, None, live_models={"weak", "fresh"})
    assert dead.model == "fresh"
    assert dead.fallbacks == ("weak",)
    assert "skipped strong: no live worker" in dead.reason
    assert set(dead.expected_quality) == set(costs)
