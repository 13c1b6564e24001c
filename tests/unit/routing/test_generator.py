"""The many-model outcome generator recovers the abilities, skills and specialists it was given."""

import numpy as np
from scipy.stats import spearmanr

from bench.routing_generator import PROFILES, Profile, generate_set

from .conftest import clustered_vectors


def _generated(profile: Profile, rows: int = 24_000):
    vectors = clustered_vectors(3000, 32, clusters=profile.topics, seed=3, spread=0.3)
    failures = np.random.default_rng(4).choice([0, 1, 2], size=3000, p=[0.65, 0.2, 0.15]).astype(float)
    return generate_set(profile, failures, vectors, rows, seed=5)


def test_outcomes_recover_the_skills_they_were_drawn_from():
    g = _generated(PROFILES["premium"])
    k, topics = g.fleet.skill.shape
    given = g.fleet.ability[:, None] + g.fleet.skill          # what each model can do on each topic
    empirical = np.full((k, topics), np.nan)
    expected = np.full((k, topics), np.nan)
    for t in range(topics):
        rows = g.topics == t
        if rows.sum() > 200:
            empirical[:, t] = g.outcomes[rows].mean(axis=0)
            expected[:, t] = g.probability[rows].mean(axis=0)
    seen = ~np.isnan(empirical)
    assert seen.sum() >= k * topics // 2
    assert np.abs(empirical[seen] - expected[seen]).max() < 0.06  # sampling noise only
    assert spearmanr(empirical[seen], given[seen]).statistic > 0.9
    for name, boosted in g.fleet.specialists.items():  # specialists are better on their topics
        j = g.fleet.names.index(name)
        on = [t for t in boosted if seen[j, t]]
        off = [t for t in range(topics) if seen[j, t] and t not in boosted]
        if on:
            assert empirical[j, on].mean() > empirical[j, off].mean() + 0.1


def test_real_difficulty_carries_over_and_prices_span_two_orders_of_magnitude():
    g = _generated(PROFILES["balanced"], rows=6000)
    assert g.fleet.price_out.max() / g.fleet.price_out.min() >= 100
    cost = g.fleet.price_out * g.fleet.output_tokens
    assert cost.max() / cost.min() > 30  # lengths are drawn independently of price
    vectors_failures = np.random.default_rng(4).choice([0, 1, 2], size=3000, p=[0.65, 0.2, 0.15]).astype(float)
    hard = vectors_failures[g.rows] == 2
    easy = vectors_failures[g.rows] == 0
    assert g.outcomes[hard].mean() < g.outcomes[easy].mean() - 0.2


def test_the_same_seed_gives_the_same_table():
    a, b = _generated(PROFILES["specialists"], rows=2000), _generated(PROFILES["specialists"], rows=2000)
    assert np.array_equal(a.outcomes, b.outcomes) and np.array_equal(a.rows, b.rows)
