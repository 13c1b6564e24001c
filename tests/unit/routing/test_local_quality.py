"""LocalQualityRanker: hand-computed estimates, replay determinism, the exploration bound, bandit learning."""

import json

import numpy as np
import pytest

from core.errors import RetriableError
from core.routing.feedback import Observation, ObservationItem
from core.routing.index import NeighbourIndex
from core.routing.local_quality import LocalQualityConfig, LocalQualityRanker, explore_draw

from .conftest import clustered_vectors, unit_vectors

DIM = 16


def item(i: int, key: str, obs: list[tuple[str, float, float]], vec=None) -> ObservationItem:
    return ObservationItem(f"f{i}", key, tuple(Observation(m, y, w) for m, y, w in obs), vec)


def test_estimates_follow_the_level_formulas():
    config = LocalQualityConfig(neighbours=1, local_prior=2.0, clusters=(), global_prior=1.0, prior_quality=0.5,
                                explore_share=0.0)
    ranker = LocalQualityRanker(config, NeighbourIndex(dim=DIM))
    v = unit_vectors(3, DIM, seed=1)
    ranker.apply(item(0, "near", [("a", 1.0, 1.0), ("b", 0.0, 1.0)], v[0]))
    ranker.apply(item(1, "other", [("a", 0.0, 1.0)], v[1]))
    ranker.apply(item(2, "far", [("b", 1.0, 0.5)], v[2]))
    est = ranker.estimate_for(v[0], np.asarray([ranker.index.row("near")]))
    # global: a = (1 + 0 + 1*0.5) / (2 + 1) = 0.5;  b = (0 + 0.5 + 0.5) / (1.5 + 1) = 0.4
    assert est.global_.tolist() == pytest.approx([0.5, 0.4])
    assert est.cluster.tolist() == pytest.approx([0.5, 0.4])  # no cluster level
    # local (near only): a = (1 + 2*0.5) / (1 + 2) = 2/3;  b = (0 + 2*0.4) / (1 + 2) = 0.26667
    assert est.quality.tolist() == pytest.approx([2 / 3, 0.8 / 3])
    # strengths: global a 3, b 2.5; local 1 + min(2, global) = 3 for both
    assert est.strength.tolist() == pytest.approx([3.0, 3.0])


def test_cluster_levels_find_topics_and_shrink_towards_them():
    """Two topics of 40 prompts each; "a" always right on topic 0, "b" on topic 1."""
    config = LocalQualityConfig(neighbours=1, local_prior=4.0, clusters=(2,), cluster_prior=4.0, explore_share=0.0)
    ranker = LocalQualityRanker(config, NeighbourIndex(dim=DIM))
    v = clustered_vectors(80, DIM, clusters=2, seed=3, spread=0.2)
    topic = np.argmax(v @ unit_vectors(2, DIM, 4).T, axis=1)
    for i in range(80):  # the 64th prompt trains the clusters; the last 16 join their nearest centroid
        t = int(topic[i])
        ranker.apply(item(i, f"p{i}", [("a", float(t == 0), 1.0), ("b", float(t == 1), 1.0)], v[i]))
    counts = np.bincount(topic, minlength=2)
    g = (counts + 1.0) / 82.0  # global: "a" right on topic 0's prompts, "b" on topic 1's, prior 1 of 2
    for t in (0, 1):
        query = v[int(np.flatnonzero(topic == t)[0])]
        est = ranker.estimate_for(query, np.empty(0, dtype=np.int64))  # no local evidence: the cluster speaks
        assert est.global_.tolist() == pytest.approx(g.tolist())
        n = counts[t]  # the cluster is the topic: its winner was right n times, the other never
        assert est.cluster[t] == pytest.approx((n + 4.0 * g[t]) / (n + 4.0))
        assert est.cluster[1 - t] == pytest.approx(4.0 * g[1 - t] / (n + 4.0))
        assert est.quality.tolist() == pytest.approx(est.cluster.tolist())


def test_an_unrated_candidate_gets_the_prior_and_the_weakest_certainty():
    ranker = LocalQualityRanker(LocalQualityConfig(explore_share=0.0), NeighbourIndex(dim=DIM))
    ranker.apply(item(0, "p", [("a", 1.0, 1.0)], unit_vectors(1, DIM, 2)[0]))
    choice = ranker.route(unit_vectors(1, DIM, 3)[0], {"a": 2.0, "new": 1.0}, None, None, {"a", "new"})
    assert choice.scores["new"] == 0.5 and choice.scores["a"] > 0.5
    assert choice.model == "a" and not choice.exploratory


def _stream(n: int, seed: int) -> list[ObservationItem]:
    rng = np.random.default_rng(seed)
    vectors = unit_vectors(n, DIM, seed + 1)
    seen: set[str] = set()
    out = []
    for i in range(n):
        key = f"p{int(rng.integers(0, n // 2))}"
        model = ["a", "b", "c"][int(rng.integers(0, 3))]
        obs = [(model, float(rng.random()), float(rng.choice([0.25, 0.5, 1.0])))]
        out.append(item(i, key, obs, None if key in seen else vectors[i]))
        seen.add(key)
    return out


@pytest.mark.parametrize("horizon", [0, 3])
def test_replaying_the_stream_reproduces_the_state_exactly(horizon):
    """Horizon 3 crosses several exact power-of-two rescales (every 256 half-lives = 768 items)."""
    config = LocalQualityConfig(neighbours=3, clusters=(2, 4), horizon=horizon)
    stream = _stream(2000, seed=4)
    live = LocalQualityRanker(config, NeighbourIndex(dim=DIM, exact_limit=64))
    live.apply_many(stream[:1200])
    keys = live.index.keys
    raw = {it.prompt_key: it.embedding for it in stream if it.embedding is not None}
    rebuilt = NeighbourIndex(dim=DIM, exact_limit=64)  # as the agent does: stored raw embeddings, in order
    rebuilt.add(keys, np.stack([raw[k] for k in keys]))
    restored = LocalQualityRanker.from_snapshot(json.loads(json.dumps(live.snapshot())), rebuilt)
    assert restored.snapshot() == live.snapshot()
    for it in stream[1200:]:
        live.apply(it)
    restored.apply_many(stream[1200:])
    replayed = LocalQualityRanker(config, NeighbourIndex(dim=DIM, exact_limit=64))
    replayed.apply_many(stream)
    assert replayed.snapshot() == live.snapshot() == restored.snapshot()
    for i, q in enumerate(unit_vectors(20, DIM, seed=99)):
        costs = {"a": 1.0, "b": 2.0, "c": 3.0}
        first = live.route(q, costs, None, 10.0, set(costs), request_id=f"r{i}")
        assert first == replayed.route(q, costs, None, 10.0, set(costs), request_id=f"r{i}")
        assert first == restored.route(q, costs, None, 10.0, set(costs), request_id=f"r{i}")


def test_recency_halves_an_observation_every_horizon_items():
    config = LocalQualityConfig(neighbours=1, clusters=(), horizon=2, explore_share=0.0)
    ranker = LocalQualityRanker(config, NeighbourIndex(dim=DIM))
    v = unit_vectors(2, DIM, seed=5)
    ranker.apply(item(0, "old", [("a", 0.0, 1.0)], v[0]))
    ranker.apply(item(1, "x", [("b", 1.0, 1.0)], v[1]))
    ranker.apply(item(2, "x", [("b", 1.0, 1.0)], None))
    est = ranker.estimate_for(v[0], np.asarray([ranker.index.row("old")]))
    # a's observation is 3 items old at query time -> weight 2 ** (-3/2)
    w = 2 ** -1.5
    g = (0 + 2.0 * 0.5) / (w + 2.0)
    assert est.global_[0] == pytest.approx(g)


def test_exploration_never_exceeds_its_bound_and_never_leaves_the_budget():
    share = 0.2
    config = LocalQualityConfig(explore_share=share)
    ranker = LocalQualityRanker(config, NeighbourIndex(dim=DIM))
    v = unit_vectors(40, DIM, seed=6)
    for i in range(40):  # "a" looks best, "b" is cheap, "c" is best but over budget
        ranker.apply(item(i, f"p{i}", [("a", float(i % 3 != 0), 1.0), ("b", float(i % 2), 1.0), ("c", 1.0, 1.0)],
                          v[i]))
    costs = {"a": 3.0, "b": 1.0, "c": 9.0, "d": 2.0}
    live = {"a", "b", "c"}  # d has no worker
    explored = drawn = 0
    n = 4000
    for i in range(n):
        rid = f"request-{i}"
        u, _ = explore_draw(config.explore_seed, rid)
        choice = ranker.route(v[i % 40], costs, 5.0, None, live, request_id=rid)
        assert costs[choice.model] <= 5.0 and choice.model in live
        if choice.exploratory:
            explored += 1
            assert u < share, "a request only explores when its draw is under the bound"
            assert choice.reason.startswith("explore:")
        drawn += u < share
    assert explored <= drawn
    # the draw is uniform: the share of requests allowed to explore is the bound (binomial, 4 sd)
    assert abs(drawn / n - share) < 4 * np.sqrt(share * (1 - share) / n)
    assert explored > 0


def test_a_decision_is_reproducible_from_the_state_and_the_request_id():
    ranker = LocalQualityRanker(LocalQualityConfig(explore_share=1.0), NeighbourIndex(dim=DIM))
    v = unit_vectors(5, DIM, seed=7)
    for i in range(5):
        ranker.apply(item(i, f"p{i}", [("a", 0.5, 1.0), ("b", 0.5, 1.0)], v[i]))
    costs = {"a": 1.0, "b": 1.0}
    picks = {ranker.route(v[0], costs, None, None, set(costs), request_id=f"r{i}").model for i in range(50)}
    assert picks == {"a", "b"}  # Thompson draws differ between requests...
    for i in range(50):  # ...but never for the same request
        assert (ranker.route(v[0], costs, None, None, set(costs), request_id=f"r{i}")
                == ranker.route(v[0], costs, None, None, set(costs), request_id=f"r{i}"))


def test_no_live_candidate_is_a_retriable_error():
    ranker = LocalQualityRanker(LocalQualityConfig(), NeighbourIndex(dim=DIM))
    with pytest.raises(RetriableError):
        ranker.route(unit_vectors(1, DIM, 1)[0], {"a": 1.0}, None, None, set(), request_id="r")


def simulate_bandit(explore_share: float, requests: int, seed: int, accuracy: np.ndarray) -> np.ndarray:
    """Two models, four topics; feedback (thumbs) on half the answers. Returns per-request correctness."""
    rng = np.random.default_rng(seed)
    topics = rng.integers(0, accuracy.shape[1], size=requests)
    vectors = clustered_vectors(requests, DIM, clusters=accuracy.shape[1], seed=11, point_seed=seed)
    centres = unit_vectors(accuracy.shape[1], DIM, 12)
    topics = np.argmax(vectors @ centres.T, axis=1)
    ranker = LocalQualityRanker(LocalQualityConfig(explore_share=explore_share), NeighbourIndex(dim=DIM))
    ranker.add_models(["small", "large"])
    costs = {"small": 1e-6, "large": 2e-6}
    correct = np.zeros(requests)
    for i in range(requests):
        choice = ranker.route(vectors[i], costs, None, None, set(costs), request_id=f"s{seed}-{i}")
        m = 0 if choice.model == "small" else 1
        correct[i] = rng.random() < accuracy[m, topics[i]]
        if rng.random() < 0.5:
            ranker.apply(item(i, f"q{seed}-{i}", [(choice.model, float(correct[i]), 1.0)], vectors[i]))
    return correct


def test_bandit_feedback_teaches_the_per_topic_winner_within_a_few_hundred_requests():
    """What the closed loop needs: the cheap model wins topics 0-1, the pricier one topics 2-3.
    600 requests, thumbs on half of them; the last 200 are scored. Frozen = all to the cheaper one."""
    accuracy = np.array([[0.8, 0.7, 0.2, 0.6],    # small
                         [0.3, 0.4, 0.8, 0.95]])  # large
    frozen, best = accuracy[0].mean(), accuracy.max(axis=0).mean()
    last = {share: np.mean([simulate_bandit(share, 600, s, accuracy)[-200:].mean() for s in range(3)])
            for share in (0.0, 0.1)}
    assert last[0.1] > frozen + 0.15 and last[0.1] > best - 0.05
    assert last[0.1] > last[0.0] - 0.03  # exploring 10 % of requests costs little here


def test_exploration_finds_a_better_model_that_greedy_routing_may_never_try():
    """The cheap model is decent everywhere (0.6-0.7), so its estimates stay above the prior and a
    greedy router may never try the better, pricier one."""
    accuracy = np.array([[0.65, 0.7, 0.6, 0.65],
                         [0.9, 0.6, 0.9, 0.95]])
    runs = {share: [simulate_bandit(share, 600, s, accuracy)[-200:].mean() for s in range(3)]
            for share in (0.0, 0.1)}
    assert min(runs[0.1]) > accuracy[0].mean() + 0.15
    assert np.mean(runs[0.1]) > np.mean(runs[0.0]) + 0.05
    assert min(runs[0.0]) < accuracy[0].mean() + 0.05  # a greedy run that stayed with the cheap model
