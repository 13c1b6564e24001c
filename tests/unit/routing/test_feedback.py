"""Feedback -> comparison rules (docs/ROUTING.md)."""

import pytest

from core.routing.elo import Comparison, apply_comparisons, expected_score
from core.routing.feedback import FeedbackItem, from_graded, from_pairwise, from_thumbs


def test_pairwise_winner_loser_tie():
    assert from_pairwise("a", "b", "a") == (Comparison("a", "b", 1.0),)
    assert from_pairwise("a", "b", "b") == (Comparison("a", "b", 0.0),)
    assert from_pairwise("a", "b", "tie") == (Comparison("a", "b", 0.5),)
    with pytest.raises(ValueError):
        from_pairwise("a", "b", "c")  # type: ignore[arg-type]


def test_graded_round_robin_in_sorted_order_with_ties():
    games = from_graded({"c": 0.9, "a": 0.5, "b": 0.55}, tie_margin=0.1)
    assert games == (
        Comparison("a", "b", 0.5),  # |0.5 - 0.55| <= 0.1: draw
        Comparison("a", "c", 0.0),
        Comparison("b", "c", 0.0),
    )
    assert from_graded({"x": 1.0, "y": 0.0}) == (Comparison("x", "y", 1.0),)
    assert from_graded({"x": 1.0, "y": 1.0}) == (Comparison("x", "y", 0.5),)
    assert from_graded({"only": 3.0}) == ()
    with pytest.raises(ValueError):
        from_graded({"x": 1.0, "y": 0.0}, tie_margin=-1)


def test_thumbs_is_one_game_against_the_pool_average():
    games = from_thumbs("b", up=True, pool=["a", "b", "c"])
    assert games == (Comparison("b", "a", 1.0, 0.5), Comparison("b", "c", 1.0, 0.5))
    ratings = {"a": 1100.0, "b": 1000.0, "c": 900.0}
    mean_e = (expected_score(1000.0, 1100.0) + expected_score(1000.0, 900.0)) / 2
    before = dict(ratings)
    apply_comparisons(ratings, games, k=32.0, scale=400.0, initial_rating=1000.0)
    # Legs are applied in sequence. Leg 1 (b vs a): E = 1/(1+10**0.25) = 0.3599350,
    # step 0.5 * 32 * 0.6400650 = 10.2410; leg 2 (b at 1010.2410 vs c at 900): E = 0.6535545,
    # step 16 * 0.3464455 = 5.5431. Total 15.7841, close to the one-game rule 32 * (1 - mean E) = 16.0
    # (mean E = 0.5 exactly here by symmetry); the gap is the second-order effect of the first leg.
    assert ratings["b"] - before["b"] == pytest.approx(15.7845, abs=1e-3)
    assert ratings["b"] - before["b"] == pytest.approx(32.0 * (1.0 - mean_e), abs=0.3)
    assert sum(ratings.values()) == pytest.approx(sum(before.values()), abs=1e-9)
    down = from_thumbs("b", up=False, pool=["b", "a"])
    assert down == (Comparison("b", "a", 0.0, 1.0),)


def test_thumbs_without_opponents_gives_nothing():
    assert from_thumbs("a", up=True, pool=["a"]) == ()
    assert from_thumbs("a", up=False, pool=[]) == ()


def test_feedback_item_requires_ids():
    with pytest.raises(ValueError):
        FeedbackItem("", "p", ())
    with pytest.raises(ValueError):
        FeedbackItem("f", "", ())
