"""In-memory nearest-neighbour index over unit-norm prompt embeddings (cosine = dot product).

Two regimes, chosen by size so small fleets pay nothing for approximation:

* **exact** while the index holds at most ``exact_limit`` vectors: one matrix-vector product.
* **IVF** (inverted file, as in faiss' IndexIVFFlat) above that: spherical k-means centroids
  (``lists_per_sqrt * sqrt(n)`` of them) partition the vectors into lists stored contiguously;
  a query scans the ``nprobe`` lists whose centroids are closest. At 100k vectors that is about
  1.6k rows instead of 100k, which keeps a routing decision around a millisecond on one core;
  ``search_exact`` is the brute-force reference used to measure recall.

Determinism (why the training points are fixed): centroids are (re)trained exactly when the
size crosses ``exact_limit * growth**j``, on a seeded sample of the rows present then, and a
batch that crosses a threshold is split there. So the index state is a function of the ordered
(key, vector) sequence alone, whatever the batching: a router rebuilt from stored vectors
answers exactly like the live one.

Cost model: an append is O(nlist * dim) (one assignment); a retrain is O(n * nlist * dim) and
happens log_growth(n) times in total, i.e. amortised O(1) per append, but the append that
crosses a threshold stalls for seconds at ~100k vectors (callers on an event loop should run
``add`` in a worker thread).

Ties in similarity are broken by insertion order, so results never depend on sort stability.
Re-adding a known key is ignored (a prompt's embedding never changes).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def _unit_rows(vectors: np.ndarray, dim: int) -> np.ndarray:
    arr = np.asarray(vectors, dtype=np.float32)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] != dim:
        raise ValueError(f"expected vectors of shape (n, {dim}), got {arr.shape}")
    norms = np.linalg.norm(arr, axis=1, keepdims=True)
    if not np.all(np.isfinite(norms)) or np.any(norms == 0):
        raise ValueError("vectors must be finite and non-zero")
    out: np.ndarray = (arr / norms).astype(np.float32)
    return out


def spherical_kmeans(data: np.ndarray, nlist: int, iterations: int, seed: int) -> np.ndarray:
    """Unit-norm centroids of ``data`` (rows unit-norm) by Lloyd's algorithm on cosine similarity."""
    rng = np.random.default_rng(seed)
    centroids = data[rng.choice(len(data), size=nlist, replace=False)].copy()
    for _ in range(iterations):
        assign = np.argmax(data @ centroids.T, axis=1)
        sums = np.zeros_like(centroids)
        np.add.at(sums, assign, data)
        counts = np.bincount(assign, minlength=nlist)
        empty = counts == 0
        if empty.any():  # reseed empty lists on random points so every list stays usable
            sums[empty] = data[rng.choice(len(data), size=int(empty.sum()), replace=False)]
        norms = np.linalg.norm(sums, axis=1, keepdims=True)
        centroids = (sums / np.maximum(norms, 1e-12)).astype(np.float32)
    return centroids


class _GrowableRows:
    """A float32 matrix with amortised O(1) row appends (capacity doubling) plus row ids."""

    def __init__(self, dim: int, capacity: int = 64) -> None:
        self.data = np.empty((capacity, dim), dtype=np.float32)
        self.ids = np.empty(capacity, dtype=np.int64)
        self.size = 0

    def extend(self, rows: np.ndarray, ids: np.ndarray) -> None:
        need = self.size + len(rows)
        if need > len(self.data):
            capacity = max(need, 2 * len(self.data))
            data = np.empty((capacity, self.data.shape[1]), dtype=np.float32)
            data[: self.size] = self.data[: self.size]
            new_ids = np.empty(capacity, dtype=np.int64)
            new_ids[: self.size] = self.ids[: self.size]
            self.data, self.ids = data, new_ids
        self.data[self.size: need] = rows
        self.ids[self.size: need] = ids
        self.size = need


class NeighbourIndex:
    """Keys with unit-norm vectors; ``search`` returns the nearest keys by cosine similarity."""

    def __init__(
        self,
        *,
        dim: int = 384,
        exact_limit: int = 8192,
        nprobe: int = 16,
        growth: int = 2,
        lists_per_sqrt: float = 4.0,
        train_points_per_list: int = 16,
        kmeans_iterations: int = 8,
        seed: int = 0,
    ) -> None:
        if (dim < 1 or exact_limit < 64 or nprobe < 1 or growth < 2 or kmeans_iterations < 1
                or lists_per_sqrt <= 0 or train_points_per_list < 1):
            raise ValueError(
                f"bad index settings: dim={dim} exact_limit={exact_limit} nprobe={nprobe} "
                f"growth={growth} lists_per_sqrt={lists_per_sqrt} "
                f"train_points_per_list={train_points_per_list} kmeans_iterations={kmeans_iterations}"
            )
        self.dim = dim
        self.exact_limit = exact_limit
        self.nprobe = nprobe
        self.growth = growth
        self.lists_per_sqrt = lists_per_sqrt
        self.train_points_per_list = train_points_per_list
        self.kmeans_iterations = kmeans_iterations
        self.seed = seed
        self._rows = _GrowableRows(dim)
        self._keys: list[str] = []
        self._row_of: dict[str, int] = {}
        self._next_train = exact_limit + 1
        self._centroids: np.ndarray | None = None
        self._lists: list[_GrowableRows] = []

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._row_of

    @property
    def keys(self) -> list[str]:
        """Keys in insertion order (row ``i`` of the index is ``keys[i]``)."""
        return list(self._keys)

    def key(self, row: int) -> str:
        return self._keys[row]

    def row(self, key: str) -> int:
        return self._row_of[key]

    def head(self, n: int) -> np.ndarray:
        """Read-only view of the first ``n`` unit vectors, in insertion order."""
        view: np.ndarray = self._rows.data[:n]
        view.flags.writeable = False
        return view

    def vector(self, key: str) -> np.ndarray:
        out: np.ndarray = self._rows.data[self._row_of[key]].copy()
        return out

    @property
    def is_exact(self) -> bool:
        return self._centroids is None

    def add(self, ids: Sequence[str], vectors: np.ndarray) -> None:
        """Append (key, vector) pairs in order; known keys are skipped."""
        unit = _unit_rows(vectors, self.dim)
        if len(ids) != len(unit):
            raise ValueError(f"{len(ids)} ids for {len(unit)} vectors")
        fresh: list[int] = []
        batch_keys: set[str] = set()
        for i, key in enumerate(ids):
            if key not in self._row_of and key not in batch_keys:
                batch_keys.add(key)
                fresh.append(i)
        start = 0
        while start < len(fresh):
            # Split the batch at the next training threshold (see the module docstring).
            room = self._next_train - len(self._keys)
            chunk = fresh[start: start + room]
            self._append([ids[i] for i in chunk], unit[chunk])
            start += len(chunk)
            if len(self._keys) == self._next_train:
                self._train()

    def _append(self, keys: list[str], unit: np.ndarray) -> None:
        first = len(self._keys)
        rows = np.arange(first, first + len(keys), dtype=np.int64)
        for offset, key in enumerate(keys):
            self._row_of[key] = first + offset
        self._keys.extend(keys)
        self._rows.extend(unit, rows)
        if self._centroids is not None:
            self._assign(unit, rows)

    def _assign(self, unit: np.ndarray, rows: np.ndarray) -> None:
        assert self._centroids is not None
        lists = np.argmax(unit @ self._centroids.T, axis=1)
        order = np.argsort(lists, kind="stable")  # group by list, insertion order inside a list
        sorted_lists = lists[order]
        starts = np.flatnonzero(np.r_[True, sorted_lists[1:] != sorted_lists[:-1]])
        ends = np.r_[starts[1:], len(order)]
        for start, end in zip(starts.tolist(), ends.tolist(), strict=True):
            chosen = order[start:end]
            self._lists[int(sorted_lists[start])].extend(unit[chosen], rows[chosen])

    def _train(self) -> None:
        n = len(self._keys)
        nlist = max(16, round(self.lists_per_sqrt * math.sqrt(n)))
        rng = np.random.default_rng(self.seed + n)
        sample_size = min(n, self.train_points_per_list * nlist)
        sample = self._rows.data[np.sort(rng.choice(n, size=sample_size, replace=False))]
        self._centroids = spherical_kmeans(sample, nlist, self.kmeans_iterations, self.seed + n)
        self._lists = [_GrowableRows(self.dim, capacity=16) for _ in range(nlist)]
        self._assign(self._rows.data[:n], np.arange(n, dtype=np.int64))
        self._next_train = n * self.growth

    def search(self, query: np.ndarray, n: int) -> list[str]:
        """Keys of the ``n`` most similar vectors, most similar first."""
        rows, _ = self.search_rows(query, n)
        return [self._keys[int(r)] for r in rows]

    def search_rows(self, query: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows, similarities) of the ``n`` nearest, most similar first (ties: older row first)."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        q = _unit_rows(query, self.dim)[0]
        if self._centroids is None:
            size = len(self._keys)
            return _top(self._rows.data[:size] @ q, np.arange(size, dtype=np.int64), n)
        probe = min(self.nprobe, len(self._lists))
        near = np.argpartition(-(self._centroids @ q), probe - 1)[:probe]
        sims = [self._lists[int(i)].data[: self._lists[int(i)].size] @ q for i in near]
        ids = [self._lists[int(i)].ids[: self._lists[int(i)].size] for i in near]
        return _top(np.concatenate(sims), np.concatenate(ids), n)

    def search_many(self, queries: np.ndarray, n: int) -> list[np.ndarray]:
        """Rows of the ``n`` nearest per query, as ``search_rows`` returns them (batched when exact)."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        unit = _unit_rows(queries, self.dim)
        if self._centroids is not None:
            return [self.search_rows(q, n)[0] for q in unit]
        size = len(self._keys)
        ids = np.arange(size, dtype=np.int64)
        out: list[np.ndarray] = []
        for start in range(0, len(unit), 256):
            sims = unit[start:start + 256] @ self._rows.data[:size].T
            out.extend(_top(row, ids, n)[0] for row in sims)
        return out

    def search_exact(self, query: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Brute-force reference for :meth:`search_rows` (tests and recall measurements)."""
        q = _unit_rows(query, self.dim)[0]
        size = len(self._keys)
        return _top(self._rows.data[:size] @ q, np.arange(size, dtype=np.int64), n)


def _top(sims: np.ndarray, rows: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    if len(sims) == 0:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32)
    if len(sims) > n:
        # Partition on -sims but keep every row tied with the n-th best, then order exactly.
        kth = np.partition(-sims, n - 1)[n - 1]
        keep = -sims <= kth
        sims, rows = sims[keep], rows[keep]
    order = np.lexsort((rows, -sims))[:n]
    return rows[order], sims[order]
