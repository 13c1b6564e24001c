"""Online calibration of the step-cost model from a worker's own iterations."""

import numpy as np
import pytest

from core.scheduling.calibration import OnlineCostConfig, OnlineCostModel, prior_cost
from core.scheduling.cost import StepCostModel


def _iterations(true: StepCostModel, n: int, seed: int = 0, noise: float = 0.0):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        b = int(rng.integers(0, 33))
        n_pre = int(rng.integers(0, 3)) if b else int(rng.integers(1, 3))
        w = int(rng.integers(20, 400))
        p = int(rng.integers(10, 200))
        secs = true.iteration_s(b, w, n_pre, p) - true.overhead_s
        yield b, w, n_pre, p, secs * (1 + noise * rng.standard_normal())


def test_the_fit_moves_from_a_wrong_prior_to_the_machine_it_runs_on() -> None:
    true = StepCostModel(0.09, 0.004, 2e-5, 0.05, 6e-4)
    online = OnlineCostModel(prior_cost(40.0), OnlineCostConfig(refit_every=16, min_samples=16))
    assert online.model == prior_cost(40.0)
    for it in _iterations(true, 400, noise=0.05):
        online.observe(*it)
    m = online.model
    assert online.fits >= 20 and online.samples == 400
    for rows, window in ((1, 100), (8, 200), (32, 300)):
        assert m.decode_s(rows, window) == pytest.approx(true.decode_s(rows, window), rel=0.1)
    assert m.prefill_s(2, 128) == pytest.approx(true.prefill_s(2, 128), rel=0.1)
    assert online.relative_error() < 0.1


def test_directions_the_traffic_never_explores_stay_at_the_prior() -> None:
    prior = prior_cost(40.0)
    online = OnlineCostModel(prior, OnlineCostConfig(refit_every=8, min_samples=8))
    for _ in range(64):  # only single-row decode steps, twice as slow as the prior says
        online.observe(1, 100, 0, 0, 2 * prior.decode_s(1, 100))
    m = online.model
    assert m.decode_s(1, 100) == pytest.approx(2 * prior.decode_s(1, 100), rel=0.1)
    assert m.prefill_base_s == pytest.approx(prior.prefill_base_s) and m.prefill_per_token_s == pytest.approx(
        prior.prefill_per_token_s)


def test_loop_overhead_is_a_moving_average_and_junk_is_ignored() -> None:
    online = OnlineCostModel(StepCostModel(0.01, 0.0, 0.0, 0.01, 0.0), OnlineCostConfig(min_samples=1, refit_every=1,
                                                                                        overhead_smoothing=0.5))
    assert not online.observe(0, 0, 0, 0, 0.1)  # an empty iteration
    assert not online.observe(1, 10, 0, 0, float("nan"))
    online.observe(1, 10, 0, 0, 0.01, overhead_s=0.002)
    online.observe(1, 10, 0, 0, 0.01, overhead_s=0.004)
    assert online.model.overhead_s == pytest.approx(0.5 * (0.5 * 0.002) + 0.5 * 0.004)
    with pytest.raises(ValueError, match="per_token_latency_ms=0"):
        prior_cost(0)
