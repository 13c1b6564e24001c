import numpy as np
import pytest

from core.scheduling.predictor import (
    LengthPredictor,
    PredictorConfig,
    bucket_bounds,
    bucket_of,
    evaluate,
)


def _pairs(n: int, seed: int) -> list[tuple[str, int]]:
    """Prompts whose topic word decides the answer length (short ~12, medium ~100, long ~400)."""
    rng = np.random.default_rng(seed)
    topics = {"define": 12, "explain": 100, "essay": 400}
    filler = ["the", "a", "about", "cats", "rivers", "history", "of", "please", "numbers", "why"]
    out = []
    for _ in range(n):
        topic = rng.choice(list(topics))
        words = list(rng.choice(filler, size=rng.integers(3, 9)))
        words.insert(int(rng.integers(0, len(words))), str(topic))
        out.append((" ".join(words), int(topics[topic] * rng.uniform(0.8, 1.2))))
    return out


def test_buckets_are_powers_of_two() -> None:
    cfg = PredictorConfig()
    assert [bucket_of(n, cfg) for n in (0, 7, 8, 15, 16, 1023, 1024, 5000)] == [0, 0, 1, 1, 2, 7, 8, 8]
    assert bucket_bounds(0, cfg) == (0, 8)
    assert bucket_bounds(3, cfg) == (32, 64)


def test_online_learning_beats_the_majority_class_and_reports_prequential_accuracy() -> None:
    pred = LengthPredictor()
    train = _pairs(300, seed=0)
    for prompt, n in train[:30]:
        pred.observe(prompt, n)
    early = pred.accuracy
    for prompt, n in train[30:]:
        pred.observe(prompt, n)
    report = evaluate(pred, _pairs(200, seed=1))
    assert report.accuracy > 0.9 > report.majority_accuracy
    assert pred.recent_accuracy > early
    assert pred.observed == 300
    long_prompt = pred.predict("please write an essay about rivers")
    assert long_prompt.bucket == bucket_of(400, pred.config)
    assert 250 < long_prompt.tokens < 500
    assert abs(sum(long_prompt.probs) - 1) < 1e-6


def test_fit_warm_starts_without_touching_online_accuracy() -> None:
    pred = LengthPredictor()
    assert np.isnan(pred.accuracy)
    pred.fit(_pairs(300, seed=2))
    assert pred.observed == 0
    assert evaluate(pred, _pairs(100, seed=3)).accuracy > 0.9
    with pytest.raises(ValueError, match="epochs"):
        pred.fit([], epochs=0)


def test_config_validation_names_the_values() -> None:
    with pytest.raises(ValueError, match="min_log2"):
        PredictorConfig(min_log2=5, max_log2=4)
