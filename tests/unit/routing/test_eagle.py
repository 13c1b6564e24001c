"""EagleRanker: replay determinism, local ELO over exactly the N nearest, global/local mixing."""

import json

import numpy as np
import pytest

from core.routing.eagle import EagleConfig, EagleRanker, replay_orders
from core.routing.elo import Comparison, apply_comparisons
from core.routing.feedback import FeedbackItem, PairOutcome, from_pairwise
from core.routing.index import NeighbourIndex

from .conftest import mixed_stream, unit_vectors

DIM = 16


def _rebuilt_index(ranker: EagleRanker) -> NeighbourIndex:
    """What the agent does on restart: add the stored (key, vector) pairs in insertion order."""
    keys = ranker.index.keys
    fresh = NeighbourIndex(dim=DIM, exact_limit=ranker.index.exact_limit)
    fresh.add(keys, np.stack([ranker.index.vector(k) for k in keys]))
    return fresh


@pytest.mark.parametrize("order", ["stream", "shuffled"])
def test_replaying_the_stream_reproduces_the_live_ratings_exactly(order):
    config = EagleConfig(neighbours=5, local_order=order)
    stream = mixed_stream(300, DIM, seed=3)
    live = EagleRanker(config, NeighbourIndex(dim=DIM, exact_limit=64))
    live.apply_many(stream[:200])
    # Persist through JSON, as the agent does, and restart with a rebuilt index.
    restored = EagleRanker.from_snapshot(json.loads(json.dumps(live.snapshot())), _rebuilt_index(live))
    assert restored.snapshot() == live.snapshot()
    live.apply_many(stream[200:])
    restored.apply_many(stream[200:])
    replayed = EagleRanker(config, NeighbourIndex(dim=DIM, exact_limit=64))
    replayed.apply_many(stream)
    assert replayed.snapshot() == live.snapshot() == restored.snapshot()
    assert live.applied == 300 and live.last_feedback_id == "f299"
    for q in unit_vectors(20, DIM, seed=99):
        assert replayed.rank(q) == live.rank(q) == restored.rank(q)


def test_snapshot_changes_with_the_order_of_feedback():
    stream = mixed_stream(60, DIM, seed=5)
    first = {item.prompt_key: item.embedding for item in reversed(stream) if item.embedding is not None}
    # Every item carries its prompt's vector so either order can introduce the prompt.
    stream = [FeedbackItem(i.feedback_id, i.prompt_key, i.comparisons, first[i.prompt_key]) for i in stream]
    a, b = EagleRanker(index=NeighbourIndex(dim=DIM)), EagleRanker(index=NeighbourIndex(dim=DIM))
    a.apply_many(stream)
    b.apply_many(stream[30:] + stream[:30])
    assert a.global_ratings() != b.global_ratings()


def _reference_local(ranker: EagleRanker, vectors: dict[str, np.ndarray], stream, query, n):
    """Slow reference: brute-force top-n, their comparisons in stream order, replayed on dicts."""
    sims = {key: float(v @ query) for key, v in vectors.items()}
    nearest = set(sorted(sims, key=lambda k: -sims[k])[:n])
    games = [c for item in stream if item.prompt_key in nearest for c in item.comparisons]
    cfg = ranker.config
    orders = ([tuple(range(len(games)))] if cfg.local_order == "stream"
              else replay_orders(cfg.order_seed, len(games), cfg.local_orders))
    total = dict.fromkeys(ranker.models, 0.0)
    for order in orders:
        ratings = ranker.global_ratings()
        apply_comparisons(ratings, [games[j] for j in order], cfg.k, cfg.scale, cfg.initial_rating)
        for m in total:
            total[m] += ratings[m] / len(orders)
    return total, nearest


@pytest.mark.parametrize("order", ["stream", "shuffled"])
def test_local_elo_replays_exactly_the_n_nearest_prompts(order):
    n = 7
    config = EagleConfig(neighbours=n, global_weight=0.0, local_order=order, local_orders=5)
    stream = mixed_stream(120, DIM, seed=11)
    ranker = EagleRanker(config, NeighbourIndex(dim=DIM))
    ranker.apply_many(stream)
    vectors = {key: ranker.index.vector(key) for key in ranker.index.keys}
    for query in unit_vectors(10, DIM, seed=12):
        expected, nearest = _reference_local(ranker, vectors, stream, query, n)
        assert set(ranker.neighbour_keys(query)) == nearest
        assert ranker.rank(query) == pytest.approx(expected, abs=1e-9)


def test_replay_orders_are_fixed_permutations():
    orders = replay_orders(3, 6, 4)
    assert orders == replay_orders(3, 6, 4)
    assert len(orders) == 4 and all(sorted(o) == list(range(6)) for o in orders)
    assert len(set(orders)) > 1
    assert replay_orders(4, 6, 4) != orders


def test_global_table_is_the_running_mean_of_sequential_elo():
    ranker = EagleRanker(EagleConfig(global_horizon=2), NeighbourIndex(dim=2))
    seen = []
    winners: list[PairOutcome] = ["a", "a", "b"]
    for i, winner in enumerate(winners):
        ranker.apply(FeedbackItem(f"f{i}", f"p{i}", from_pairwise("a", "b", winner), np.array([1.0, i])))
        seen.append(ranker.sequential_ratings()["a"])
    # rates 1, 1/2, then max(1/3, 1/horizon) = 1/2
    mean2 = seen[0] + 0.5 * (seen[1] - seen[0])
    assert ranker.global_ratings()["a"] == pytest.approx(mean2 + 0.5 * (seen[2] - mean2))
    plain = EagleRanker(EagleConfig(global_horizon=0), NeighbourIndex(dim=2))
    plain.apply(FeedbackItem("f", "p", from_pairwise("a", "b", "a"), np.array([1.0, 0.0])))
    assert plain.global_ratings() == plain.sequential_ratings() == {"a": 1016.0, "b": 984.0}


def test_feedback_outside_the_neighbourhood_changes_only_the_global_part():
    config = EagleConfig(neighbours=1, global_weight=0.0, k=32.0)
    ranker = EagleRanker(config, NeighbourIndex(dim=3))
    near, far = np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])
    ranker.apply(FeedbackItem("f1", "near", from_pairwise("a", "b", "a"), near))
    ranker.apply(FeedbackItem("f2", "far", from_pairwise("a", "b", "b"), far))
    g = ranker.global_ratings()
    # Local = global, then the single nearest prompt's game (a beat b) replayed once more.
    expected = dict(g)
    apply_comparisons(expected, [Comparison("a", "b", 1.0)], 32.0, 400.0, 1000.0)
    assert ranker.rank(near) == pytest.approx(expected)
    expected_far = dict(g)
    apply_comparisons(expected_far, [Comparison("a", "b", 0.0)], 32.0, 400.0, 1000.0)
    assert ranker.rank(far) == pytest.approx(expected_far)


def test_global_weight_one_is_global_and_mixing_is_linear():
    stream = mixed_stream(90, DIM, seed=21)
    rankers = {p: EagleRanker(EagleConfig(neighbours=5, global_weight=p), NeighbourIndex(dim=DIM))
               for p in (0.0, 0.3, 1.0)}
    for r in rankers.values():
        r.apply_many(stream)
    q = unit_vectors(1, DIM, seed=22)[0]
    g, loc, mix = rankers[1.0].rank(q), rankers[0.0].rank(q), rankers[0.3].rank(q)
    assert g == rankers[1.0].global_ratings()
    for m in g:
        assert mix[m] == pytest.approx(0.3 * g[m] + 0.7 * loc[m])


def test_unknown_prompt_without_embedding_is_rejected_without_side_effects():
    ranker = EagleRanker(index=NeighbourIndex(dim=DIM))
    before = ranker.snapshot()
    with pytest.raises(ValueError, match="no known embedding"):
        ranker.apply(FeedbackItem("f1", "p-unknown", from_pairwise("a", "b", "a")))
    assert ranker.snapshot() == before


def test_repeated_prompt_accumulates_history_in_stream_order():
    ranker = EagleRanker(index=NeighbourIndex(dim=2))
    ranker.apply(FeedbackItem("f1", "p", from_pairwise("a", "b", "a"), np.array([1.0, 0.0])))
    ranker.apply(FeedbackItem("f2", "p", from_pairwise("b", "c", "tie")))
    assert ranker.history("p") == [Comparison("a", "b", 1.0), Comparison("b", "c", 0.5)]
    assert ranker.models == ("a", "b", "c")
    assert len(ranker.index) == 1


def test_config_validation_names_the_values():
    with pytest.raises(ValueError, match="global_weight"):
        EagleConfig(global_weight=1.5)
    with pytest.raises(ValueError, match="neighbours=0"):
        EagleConfig(neighbours=0)
    with pytest.raises(ValueError, match="local_order"):
        EagleConfig(local_order="random")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="local_orders=0"):
        EagleConfig(local_orders=0)
    with pytest.raises(ValueError, match="version"):
        EagleRanker.from_snapshot({"version": 99})


def test_apply_many_equals_one_by_one_and_is_all_or_nothing():
    stream = mixed_stream(150, DIM, seed=31)
    one = EagleRanker(EagleConfig(neighbours=6), NeighbourIndex(dim=DIM, exact_limit=64))
    for item in stream:
        one.apply(item)
    many = EagleRanker(EagleConfig(neighbours=6), NeighbourIndex(dim=DIM, exact_limit=64))
    for start in range(0, len(stream), 40):
        many.apply_many(stream[start: start + 40])
    assert many.snapshot() == one.snapshot()
    assert many.index.keys == one.index.keys
    for q in unit_vectors(10, DIM, seed=32):
        assert many.rank(q) == one.rank(q)
    before = many.snapshot()
    bad = [FeedbackItem("g1", "fresh", from_pairwise("a", "b", "a"), unit_vectors(1, DIM, 1)[0]),
           FeedbackItem("g2", "unknown", from_pairwise("a", "b", "b"))]
    with pytest.raises(ValueError, match="no known embedding"):
        many.apply_many(bad)
    assert many.snapshot() == before and "fresh" not in many.index


def test_route_carries_the_ratings_of_its_own_ranking_pass():
    """The decision record's global and local ratings come from the pass that chose (issue 12)."""
    ranker = EagleRanker(EagleConfig(neighbours=5), NeighbourIndex(dim=DIM))
    ranker.apply_many(mixed_stream(120, DIM, seed=8))
    for q in unit_vectors(5, DIM, seed=9):
        choice = ranker.route(q, {"big": 3.0, "mid": 2.0, "small": 1.0, "new": 1.0}, None, None,
                              {"big", "mid", "small", "new"})
        local = dict(zip(ranker.models, ranker.local_ratings(ranker.neighbour_keys(q)), strict=True))
        for m in ("big", "mid", "small"):
            assert choice.global_scores[m] == ranker.global_ratings()[m]
            assert choice.local_scores[m] == local[m]
            assert choice.scores[m] == ranker.rank(q)[m]
        assert choice.scores["new"] == choice.global_scores["new"] == 1000.0
