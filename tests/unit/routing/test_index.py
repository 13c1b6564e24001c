"""NeighbourIndex: exact regime equals brute force, IVF recall, batching-invariant state."""

import numpy as np
import pytest

from core.routing.index import NeighbourIndex

from .conftest import clustered_vectors, unit_vectors

DIM = 24


def _brute(vectors: np.ndarray, query: np.ndarray, n: int) -> list[int]:
    sims = vectors @ query
    return sorted(range(len(vectors)), key=lambda i: (-sims[i], i))[:n]


def test_exact_regime_matches_brute_force():
    vectors = unit_vectors(500, DIM, seed=1)
    index = NeighbourIndex(dim=DIM, exact_limit=1000)
    index.add([f"k{i}" for i in range(500)], vectors)
    assert index.is_exact
    for q in unit_vectors(20, DIM, seed=2):
        rows, sims = index.search_rows(q, 10)
        assert rows.tolist() == _brute(vectors, q, 10)
        assert np.all(np.diff(sims) <= 0)
    assert index.search(vectors[7], 1) == ["k7"]


def test_ivf_recall_against_brute_force():
    vectors = clustered_vectors(4000, DIM, clusters=40, seed=3)
    index = NeighbourIndex(dim=DIM, exact_limit=256, nprobe=8)
    index.add([str(i) for i in range(len(vectors))], vectors)
    assert not index.is_exact
    queries = clustered_vectors(50, DIM, clusters=40, seed=3, point_seed=33)  # unseen points
    hits = 0
    for q in queries:
        approx = set(index.search_rows(q, 20)[0].tolist())
        exact = set(index.search_exact(q, 20)[0].tolist())
        hits += len(approx & exact)
    recall = hits / (20 * len(queries))
    assert recall >= 0.9, recall


def test_state_does_not_depend_on_batching():
    vectors = clustered_vectors(1500, DIM, clusters=12, seed=4)
    keys = [f"k{i}" for i in range(len(vectors))]
    one = NeighbourIndex(dim=DIM, exact_limit=100)
    one.add(keys, vectors)
    many = NeighbourIndex(dim=DIM, exact_limit=100)
    for start in range(0, len(keys), 37):
        many.add(keys[start: start + 37], vectors[start: start + 37])
    for q in unit_vectors(25, DIM, seed=5):
        assert one.search(q, 15) == many.search(q, 15)


def test_duplicates_ties_and_validation():
    index = NeighbourIndex(dim=3)
    e = np.eye(3, dtype=np.float32)
    index.add(["a", "b", "a"], np.stack([e[0], e[0], e[1]]))
    assert len(index) == 2
    assert np.allclose(index.vector("a"), e[0])  # the first vector for a key wins
    assert index.search(e[0], 2) == ["a", "b"]  # equal similarity: older first
    index.add(["c"], 5 * e[2])  # normalised on the way in
    assert np.allclose(index.vector("c"), e[2])
    with pytest.raises(ValueError):
        index.add(["d"], np.zeros((1, 3)))
    with pytest.raises(ValueError):
        index.add(["d", "e"], e[:1])
    with pytest.raises(ValueError):
        index.search_rows(e[0], 0)
    with pytest.raises(ValueError):
        NeighbourIndex(dim=3, nprobe=0)
