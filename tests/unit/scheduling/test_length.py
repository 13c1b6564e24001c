"""Output length as a distribution: quantiles, caps and conditioning on tokens already generated."""

import math

import pytest

from core.scheduling.length import LengthDistribution
from core.scheduling.predictor import LengthPredictor, PredictorConfig, bucket_distribution


def test_quantiles_interpolate_inside_segments_and_points_are_exact() -> None:
    d = LengthDistribution(((0.0, 10.0, 0.5), (10.0, 10.0, 0.25), (20.0, 40.0, 0.25)))
    assert d.quantile(0.25) == pytest.approx(5.0)
    assert d.quantile(0.6) == pytest.approx(10.0)  # inside the point mass
    assert d.quantile(0.875) == pytest.approx(30.0)
    assert d.quantile(1.0) == pytest.approx(40.0)
    assert d.mean == pytest.approx(0.5 * 5 + 0.25 * 10 + 0.25 * 30)
    assert d.cdf(5.0) == pytest.approx(0.25) and d.cdf(15.0) == pytest.approx(0.75)
    assert LengthDistribution.point(7).quantile(0.3) == 7


def test_bad_distributions_are_refused_with_the_values() -> None:
    with pytest.raises(ValueError, match=r"sum to 0\.5"):
        LengthDistribution(((0.0, 1.0, 0.5),))
    with pytest.raises(ValueError, match="overlap"):
        LengthDistribution(((0.0, 10.0, 0.5), (5.0, 12.0, 0.5)))
    with pytest.raises(ValueError, match=r"q=1\.5"):
        LengthDistribution.point(3).quantile(1.5)


def test_capping_moves_the_mass_beyond_the_cap_to_the_cap() -> None:
    d = LengthDistribution(((0.0, 100.0, 1.0),)).capped(40)
    assert d.quantile(0.3) == pytest.approx(30.0)
    assert d.quantile(0.5) == pytest.approx(40.0)
    assert d.upper == 40


def test_remaining_length_is_conditioned_on_outliving_the_tokens_generated() -> None:
    d = LengthDistribution(((8.0, 16.0, 0.5), (16.0, 32.0, 0.5)))
    rest = d.remaining(16)  # the short bucket is ruled out; at least one more token is to come
    assert rest.quantile(0.5) == pytest.approx(8.5)
    assert rest.upper == pytest.approx(16.0)
    # Proven wrong (generated beyond every segment): the next power-of-two bucket, [g, 2g].
    assert d.remaining(40).quantile(1.0) == pytest.approx(40.0)
    assert d.remaining(40, cap=50).quantile(1.0) == pytest.approx(10.0)


def test_the_fast_remaining_quantile_equals_the_explicit_one() -> None:
    cfg = PredictorConfig()
    probs = [0.05, 0.1, 0.3, 0.25, 0.15, 0.1, 0.03, 0.01, 0.01]
    d = bucket_distribution(probs, cfg)
    for g in (0, 3, 17, 100, 300, 900, 3000):
        for cap in (None, g + 1, g + 64, 2048):
            for q in (0.0, 0.1, 0.5, 0.9, 1.0):
                want = d.remaining(g, cap).quantile(q)
                assert d.remaining_quantile(g, q, cap) == pytest.approx(want, rel=1e-9), (g, cap, q)


def test_the_predictor_returns_its_buckets_as_a_distribution() -> None:
    p = LengthPredictor()
    p.fit([("short answer please", 5)] * 20 + [("explain at length the history of", 300)] * 20, epochs=3)
    pred = p.predict("short answer please")
    assert pred.distribution is not None
    assert math.isclose(sum(w for *_, w in pred.distribution.segments), 1.0)
    long = p.predict("explain at length the history of").distribution
    assert long is not None and pred.distribution.quantile(0.5) < long.quantile(0.5)
