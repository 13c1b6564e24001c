"""ELO maths against values computed by hand (see the comments for the arithmetic)."""

import math

import pytest

from core.routing.elo import Comparison, apply_comparisons, expected_score, update_pair


def test_expected_score_hand_values():
    assert expected_score(1000.0, 1000.0) == 0.5
    # 200 points ahead: 1 / (1 + 10 ** -0.5) = 1 / 1.316227766 = 0.7597469266
    assert expected_score(1200.0, 1000.0) == pytest.approx(0.7597469266, abs=1e-10)
    # 400 points behind: 1 / (1 + 10) = 1/11
    assert expected_score(1000.0, 1400.0) == pytest.approx(1 / 11, abs=1e-12)
    # a smaller scale makes the same gap more decisive: 1 / (1 + 10 ** -1) = 10/11
    assert expected_score(1200.0, 1000.0, scale=200.0) == pytest.approx(10 / 11, abs=1e-12)


def test_update_pair_hand_values():
    # equal ratings, a wins: delta = 32 * (1 - 0.5) = 16
    assert update_pair(1000.0, 1000.0, 1.0) == (1016.0, 984.0)
    # favourite loses: delta = 32 * (0 - 0.7597469266) = -24.3119016528
    a, b = update_pair(1200.0, 1000.0, 0.0)
    assert a == pytest.approx(1175.6880983473, abs=1e-9)
    assert b == pytest.approx(1024.3119016527, abs=1e-9)
    # K scales the step: K = 10 on an even game, draw for the 200-point favourite
    a, b = update_pair(1200.0, 1000.0, 0.5, k=10.0)
    assert a == pytest.approx(1200.0 + 10 * (0.5 - 0.7597469266), abs=1e-9)
    assert a + b == pytest.approx(2200.0, abs=1e-9)


def test_apply_comparisons_sequence_and_initial_rating():
    ratings: dict[str, float] = {}
    games = [Comparison("a", "b", 1.0), Comparison("a", "b", 0.5)]
    apply_comparisons(ratings, games, k=32.0, scale=400.0, initial_rating=1000.0)
    # game 1: 1016 / 984. game 2 (draw): E_a = 1 / (1 + 10 ** (-32/400)) = 0.5459220,
    # delta = 32 * (0.5 - 0.5459220) = -1.4695015
    assert ratings["a"] == pytest.approx(1014.5304985, abs=1e-6)
    assert ratings["b"] == pytest.approx(985.4695015, abs=1e-6)
    assert math.fsum(ratings.values()) == pytest.approx(2000.0, abs=1e-9)


def test_weighted_comparison_scales_the_step():
    ratings = {"a": 1000.0, "b": 1000.0}
    apply_comparisons(ratings, [Comparison("a", "b", 1.0, weight=0.25)], 32.0, 400.0, 1000.0)
    assert ratings == {"a": 1004.0, "b": 996.0}


@pytest.mark.parametrize(
    ("a", "b", "score", "weight"),
    [("x", "x", 1.0, 1.0), ("x", "y", 1.5, 1.0), ("x", "y", -0.1, 1.0), ("x", "y", 1.0, 0.0),
     ("x", "y", float("nan"), 1.0)],
)
def test_comparison_rejects_bad_values(a, b, score, weight):
    with pytest.raises(ValueError):
        Comparison(a, b, score, weight)


def test_comparison_json_round_trip():
    c = Comparison("m1", "m2", 0.5, 1 / 3)
    assert Comparison.from_json(c.to_json()) == c
