"""Benchmark metrics on hand-made outcome tables."""

import numpy as np
import pytest

from bench.routing_metrics import WTP_GRID, apgr, auc_constant, auc_wtp, cpt, pgr_curve

# 4 prompts, columns (weak, strong): strong wins on prompts 0 and 1 only.
CORRECT = np.array([[0, 1], [0, 1], [1, 1], [0, 0]], dtype=float)


def test_perfect_ranking_pgr_and_cpt():
    advantage = np.array([1.0, 0.9, 0.0, -1.0])
    fraction, pgr = pgr_curve(advantage, CORRECT, seed=0)
    assert fraction.tolist() == [0, 0.25, 0.5, 0.75, 1.0]
    assert pgr.tolist() == [0, 0.5, 1.0, 1.0, 1.0]
    # area: trapezoids 0.0625 + 0.1875 + 0.25 + 0.25 = 0.75
    assert apgr(advantage, CORRECT, seed=0) == pytest.approx(0.75)
    assert cpt(advantage, CORRECT, 0.5, seed=0) == pytest.approx(25.0)
    assert cpt(advantage, CORRECT, 0.8, seed=0) == pytest.approx(40.0)  # 0.25 + 0.3/0.5 * 0.25


def test_worst_ranking_and_random_baseline():
    advantage = np.array([-1.0, -0.9, 0.0, 1.0])
    assert apgr(advantage, CORRECT, seed=0) == pytest.approx(0.25)
    assert cpt(advantage, CORRECT, 0.8, seed=0) == pytest.approx(90.0)
    rng = np.random.default_rng(0)
    big = rng.integers(0, 2, size=(4000, 2)).astype(float)
    big[:, 1] = np.maximum(big[:, 1], rng.integers(0, 2, size=4000))
    assert apgr(np.zeros(4000), big, seed=1) == pytest.approx(0.5, abs=0.03)


def test_auc_over_log_wtp():
    span = np.log10(WTP_GRID[-1]) - np.log10(WTP_GRID[0])
    assert span == pytest.approx(12.0)
    assert auc_constant(np.ones(4, dtype=int), CORRECT) == pytest.approx(12.0 * 0.75)
    cost = np.tile([0.0, 1e-3], (4, 1))
    # predicts a 0.1 quality gain everywhere: switches to strong once lambda * 0.1 > 1e-3, lambda > 1e-2
    predicted = np.tile([0.5, 0.6], (4, 1))
    auc = auc_wtp(predicted, cost, CORRECT)
    switch = np.log10(1e-2)
    expected = 0.25 * (switch - (-10)) + 0.75 * (2 - switch)
    assert auc == pytest.approx(expected, abs=0.25 * 0.25 + 1e-9)  # one grid step of slack
    # a larger predicted gap switches earlier and gets more area (calibration matters)
    assert auc_wtp(np.tile([0.5, 0.9], (4, 1)), cost, CORRECT) > auc


def test_aiq_is_calibration_free_and_orders_rankings():
    from bench.routing_metrics import aiq

    cost = np.tile([0.0, 1.0], (4, 1))
    good = np.array([[0.0, 0.9], [0.0, 0.8], [0.5, 0.5], [0.5, 0.4]])
    # good order switches prompts 0 then 1 (the two strong wins): hull (0, .25) -> (.5, .75) -> (1, .75)
    # area = 0.5 * (0.25 + 0.75) / 2 + 0.5 * 0.75 = 0.625
    assert aiq(good, cost, CORRECT, cost) == pytest.approx(0.625)
    assert aiq(good * 10, cost, CORRECT, cost) == pytest.approx(0.625)  # gaps x10, same order
    bad = good[::-1].copy()
    assert aiq(bad, cost, CORRECT, cost) < 0.625


# ---- issue 15: any number of models. Three models A (cost 1), B (cost 2), C (cost 4); two topics.
FLEET = np.array([[1, 1, 0],   # topic 0
                  [0, 1, 1],   # topic 0
                  [0, 0, 1],   # topic 1
                  [0, 0, 1]],  # topic 1
                 dtype=float)
TOPICS = np.array([0, 0, 1, 1])
COSTS = np.tile([1.0, 2.0, 4.0], (4, 1))


def test_references_by_hand():
    from bench.routing_metrics import reference_rows

    refs = reference_rows(FLEET, COSTS, COSTS, TOPICS, ("A", "B", "C"))
    assert refs["best_single"] == {"model": "C", "quality": 0.75, "cost": 4.0}
    # per-prompt oracle: A, B, C, C (cheapest correct model) -> quality 1, cost (1 + 2 + 4 + 4) / 4
    assert refs["oracle"]["quality"] == 1.0 and refs["oracle"]["cost"] == pytest.approx(2.75)
    # topic oracle: topic 0 means A .5, B 1, C .5 -> B; topic 1: A 0, B 0, C 1 -> C
    assert refs["topic_oracle"]["quality"] == 1.0 and refs["topic_oracle"]["cost"] == pytest.approx(3.0)


def test_fleet_metrics_by_hand():
    """Predictions send p0 to A always; p1, p3 to C once lambda > 3.75; p2 to B once lambda > 1.25.
    Operating points: (q .25, c 1), (q .25, c 1.25), (q .75, c 2.75)."""
    from bench.routing_metrics import fleet_metrics

    predicted = np.array([[0.9, 0.8, 0.1], [0.1, 0.2, 0.9], [0.1, 0.9, 0.2], [0.1, 0.2, 0.9]])
    m = fleet_metrics(predicted, COSTS, FLEET, COSTS, TOPICS)
    assert m["quality_at_best_single_cost"] == pytest.approx(0.75)
    assert m["cost_to_match_best_single"] == pytest.approx(2.75 / 4)
    assert m["oracle_gap_closed"] == pytest.approx(0.0)        # (0.75 - 0.75) / (1 - 0.75)
    assert m["topic_oracle_gain_reached"] == pytest.approx(0.0)
    assert m["rare_recall"] == pytest.approx(0.75)             # every prompt is answered by 1-2 models
    # a router that also sends p2 to C closes the whole gap at 3.25 <= 4
    better = predicted.copy()
    better[2] = [0.1, 0.1, 0.9]
    m = fleet_metrics(better, COSTS, FLEET, COSTS, TOPICS)
    assert m["quality_at_best_single_cost"] == 1.0
    assert m["oracle_gap_closed"] == pytest.approx(1.0) and m["topic_oracle_gain_reached"] == pytest.approx(1.0)
    assert m["cost_to_match_best_single"] == pytest.approx(3.25 / 4) and m["rare_recall"] == 1.0


def test_a_router_that_never_matches_the_best_single_model_has_no_matching_cost():
    from bench.routing_metrics import fleet_metrics

    always_a = np.tile([1.0, 0.0, 0.0], (4, 1))
    m = fleet_metrics(always_a, COSTS, FLEET, COSTS, TOPICS)
    assert m["cost_to_match_best_single"] is None
    assert m["quality_at_best_single_cost"] == 0.25
    assert m["oracle_gap_closed"] == pytest.approx((0.25 - 0.75) / 0.25)


def test_ci95_is_a_t_interval_over_splits():
    from bench.routing_eval import ci95

    interval = ci95([1.0, 2.0, 3.0])  # mean 2, sd 1, t(0.975, 2) = 4.303
    assert interval is not None
    low, high = interval
    assert (low, high) == pytest.approx((2 - 4.303 / 3 ** 0.5, 2 + 4.303 / 3 ** 0.5))
    assert ci95([1.0]) is None
