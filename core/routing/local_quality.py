"""Local quality: each model's success rate near the prompt, shrunk towards its cluster and global rates.

Flywheel's default router (docs/ROUTING.md has the evaluation that chose it over Eagle). For a
prompt with embedding ``x`` and each model ``m``:

* **global** ``g_m = (S_m + c_g * q0) / (W_m + c_g)`` over all feedback for ``m``;
* **clusters**, coarse to fine (``clusters = (8, 32, 128)``): ``t_m = (S^c_m + c_c * parent_m) /
  (W^c_m + c_c)`` over the prompts of the cluster ``c`` that ``x`` falls in, where ``parent`` is
  the next coarser level (the global rate for the coarsest): topics found from the embeddings;
* **local** ``q_m = (S^near_m + c_n * t_m) / (W^near_m + c_n)`` over the ``neighbours`` nearest
  past prompts, with ``t`` the finest cluster level;

where ``S`` / ``W`` are sums of outcome x weight / weight of the observations recorded on those
prompts. ``q_m`` is a probability that ``m`` answers well, so ``lambda * q - cost`` is directly
meaningful (no rating-to-quality map), and a model nobody has rated near ``x`` falls back to its
cluster, then global, then prior rate ``q0``. Each level's estimate counts as
``W + min(c, strength of its parent)`` observations, so a prior is never more certain than the
level it comes from; that count is the posterior's strength for exploration.

**Clusters.** Spherical k-means (``index.spherical_kmeans``, seeded) over the prompts seen so far,
retrained when the number of distinct prompts reaches 64, 128, 256, ... (a level with ``C``
clusters uses ``min(C, prompts // 8)`` of them, and none below 2). A retrain reassigns every
prompt and rebuilds the cluster sums from the per-prompt sums; between retrains a new prompt
joins its nearest centroid. Retrains happen at fixed stream positions, so the clusters are a
function of the ordered stream like everything else (a retrain at 100k prompts costs about a
second; amortised O(1) per prompt, as the index's).

**Feedback.** Every kind of feedback is an :class:`Observation` (model, outcome in [0, 1],
weight): a thumbs vote or a rating observes the model that answered, a pairwise preference
observes both models (winner 1, loser 0, tie 0.5), graded scores observe every model scored.

**Recency.** With ``horizon = h > 0``, an observation's weight halves every ``h`` feedback items
after it (so estimates follow drift); ``0`` keeps everything. Weights are stored pre-multiplied
by ``2 ** (seq / h)`` and rescaled by an exact power of two every ``RESCALE_EVERY`` half-lives.

**Exploration** (bandit feedback only tells how the chosen model did). A request explores when
``u(request_id) < explore_share`` where ``u`` is a uniform hash of the request id and
``explore_seed``: it then routes by one Thompson draw ``theta_m ~ Beta(q_m n_m, (1 - q_m) n_m)``
(seeded by the same hash) through the same budget rule, so the exploratory choice is always a
live model within the request's budget. Hence P(explore | request) <= ``explore_share`` for every
request, and the decision is reproducible from (state, request id).

**State and determinism.** The state is a pure function of the ordered feedback stream: updates
are fixed-order float additions, cluster retrains happen at fixed stream positions on seeded
samples, and the index is deterministic (``index.py``). Replaying the stream from an empty ranker
reproduces :meth:`snapshot` exactly.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from core.routing.budget import RouteChoice, choose
from core.routing.feedback import ObservationItem
from core.routing.index import NeighbourIndex, spherical_kmeans

SNAPSHOT_VERSION = 2
RESCALE_EVERY = 256
"""Half-lives between exact power-of-two rescales of the stored weights (2**256 fits a double)."""
FIRST_CLUSTERING = 64
PROMPTS_PER_CLUSTER = 8
CLUSTER_SAMPLE_PER_CENTROID = 32
KMEANS_ITERATIONS = 8


@dataclass(frozen=True)
class LocalQualityConfig:
    neighbours: int = 20
    """Nearest past prompts in the local estimate."""
    local_prior: float = 16.0
    """c_n: pseudo-observations of the finest cluster estimate in the local one."""
    clusters: tuple[int, ...] = (8, 32, 128)
    """Cluster counts of the levels between global and local, coarse to fine; () = none."""
    cluster_prior: float = 16.0
    """c_c: pseudo-observations of the parent level in a cluster estimate."""
    global_prior: float = 2.0
    """c_g: pseudo-observations of ``prior_quality`` in a model's global estimate."""
    prior_quality: float = 0.5
    """q0: the success rate assumed for a model nobody has rated (optimistic for weak fleets)."""
    horizon: int = 0
    """Half-life of an observation's weight, in feedback items; 0 = no decay."""
    explore_share: float = 0.1
    """Upper bound of P(a request explores); 0 disables exploration."""
    explore_seed: int = 0
    """Seed of the per-request exploration hash."""
    cluster_seed: int = 0
    """Seed of the k-means samples and initial centroids."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "clusters", tuple(int(c) for c in self.clusters))  # JSON gives a list
        if self.neighbours < 1:
            raise ValueError(f"neighbours must be >= 1, got {self.neighbours}")
        if any(c < 2 for c in self.clusters) or list(self.clusters) != sorted(set(self.clusters)):
            raise ValueError(f"clusters must be increasing counts >= 2, got {self.clusters}")
        if min(self.local_prior, self.cluster_prior, self.global_prior) <= 0:
            raise ValueError(f"priors must be > 0; got local={self.local_prior} cluster={self.cluster_prior} "
                             f"global={self.global_prior}")
        if not 0.0 < self.prior_quality < 1.0:
            raise ValueError(f"prior_quality must be within (0, 1), got {self.prior_quality}")
        if self.horizon < 0:
            raise ValueError(f"horizon must be >= 0, got {self.horizon}")
        if not 0.0 <= self.explore_share <= 1.0:
            raise ValueError(f"explore_share must be within [0, 1], got {self.explore_share}")


def strength_bound(config: LocalQualityConfig) -> float:
    """The posterior strength of a model nobody has rated (the weakest certainty)."""
    return min(config.local_prior, config.cluster_prior, config.global_prior)


@dataclass(frozen=True)
class Estimate:
    """Per-model estimates for one prompt (model order of the ranker)."""

    quality: np.ndarray
    """Local posterior mean q_m."""
    strength: np.ndarray
    """Pseudo-observations behind q_m (the Beta posterior's alpha + beta)."""
    cluster: np.ndarray
    """The finest cluster level's estimate (the global one when no level is trained yet)."""
    global_: np.ndarray


def explore_draw(seed: int, request_id: str) -> tuple[float, int]:
    """(u in [0, 1), Thompson seed): a pure function of the seed and the request id."""
    digest = hashlib.sha256(f"{seed}:{request_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64, int.from_bytes(digest[8:16], "big")


def _grow(matrix: np.ndarray, rows: int, cols: int) -> np.ndarray:
    r, c = matrix.shape
    if rows <= r and cols <= c:
        return matrix
    grown = np.zeros((max(rows, 2 * r) if rows > r else r, max(cols, 2 * c) if cols > c else c))
    grown[:r, :c] = matrix
    return grown


class _Level:
    """One cluster level: centroids, each prompt's cluster, per-cluster sums (scaled units)."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.centroids: np.ndarray | None = None
        self.assign = np.zeros(64, dtype=np.int64)
        self.sums = np.zeros((1, 4))
        self.weights = np.zeros((1, 4))


class LocalQualityRanker:
    """Local/cluster/global success-rate estimates over a feedback stream (see the module docstring)."""

    def __init__(self, config: LocalQualityConfig | None = None, index: NeighbourIndex | None = None) -> None:
        self.config = config or LocalQualityConfig()
        self.index = index if index is not None else NeighbourIndex()
        self._models: list[str] = []
        self._model_idx: dict[str, int] = {}
        self._sums = np.zeros((64, 4))
        self._weights = np.zeros((64, 4))
        self._global_sums = np.zeros(4)
        self._global_weights = np.zeros(4)
        self._levels = [_Level(c) for c in self.config.clusters]
        self._rows_seen = 0
        """Distinct prompts absorbed so far (index rows 0 .. rows_seen - 1)."""
        self._next_clustering = FIRST_CLUSTERING
        self._scale_base = 0
        """Feedback count at which stored weights are worth 1 (moves on every rescale)."""
        self.applied = 0
        self.last_feedback_id: str | None = None

    # ----------------------------------------------------------------- state

    @property
    def models(self) -> tuple[str, ...]:
        return tuple(self._models)

    def add_models(self, names: Iterable[str]) -> None:
        """Give models a column before any feedback names them (in this order); known ones are kept."""
        for name in names:
            self._model(name)

    def _model(self, name: str) -> int:
        idx = self._model_idx.get(name)
        if idx is None:
            idx = len(self._models)
            self._models.append(name)
            self._model_idx[name] = idx
            k = len(self._models)
            self._sums = _grow(self._sums, self._sums.shape[0], k)
            self._weights = _grow(self._weights, self._weights.shape[0], k)
            if k > len(self._global_sums):
                self._global_sums = np.concatenate([self._global_sums, np.zeros(len(self._global_sums))])
                self._global_weights = np.concatenate([self._global_weights, np.zeros(len(self._global_weights))])
            for level in self._levels:
                level.sums = _grow(level.sums, level.sums.shape[0], k)
                level.weights = _grow(level.weights, level.weights.shape[0], k)
        return idx

    def _now_factor(self) -> float:
        """Stored weight x this factor = weight as of now (1 when there is no decay)."""
        h = self.config.horizon
        return 1.0 if h == 0 else 2.0 ** (-(self.applied - self._scale_base) / h)

    def global_ratings(self) -> dict[str, float]:
        """Each model's global success-rate estimate ``g_m`` (the decision record's global rating)."""
        g, _ = self._global_estimate()
        return dict(zip(self._models, g.tolist(), strict=True))

    def _global_estimate(self) -> tuple[np.ndarray, np.ndarray]:
        c = self.config
        k = len(self._models)
        f = self._now_factor()
        w = self._global_weights[:k] * f
        g: np.ndarray = (self._global_sums[:k] * f + c.global_prior * c.prior_quality) / (w + c.global_prior)
        return g, w + c.global_prior

    def apply(self, item: ObservationItem) -> None:
        self.apply_many((item,))

    def apply_many(self, items: Iterable[ObservationItem]) -> None:
        """Absorb items in stream order (one index append); all-or-nothing on unknown prompts."""
        batch = list(items)
        keys: list[str] = []
        vectors: list[np.ndarray] = []
        pending: set[str] = set()
        for item in batch:
            if item.prompt_key in pending or item.prompt_key in self.index:
                continue
            if item.embedding is None:
                raise ValueError(f"feedback {item.feedback_id!r}: prompt {item.prompt_key!r} has no known "
                                 "embedding; send it with the first feedback for that prompt")
            pending.add(item.prompt_key)
            keys.append(item.prompt_key)
            vectors.append(np.asarray(item.embedding))
        if keys:
            self.index.add(keys, np.stack(vectors))
        for item in batch:
            self._absorb(item)

    def _see_rows(self, upto: int) -> None:
        """Register index rows ``rows_seen .. upto - 1`` in order: cluster them or retrain."""
        while self._rows_seen < upto:
            row = self._rows_seen
            self._rows_seen += 1
            self._sums = _grow(self._sums, self._rows_seen, self._sums.shape[1])
            self._weights = _grow(self._weights, self._rows_seen, self._weights.shape[1])
            if self._rows_seen == self._next_clustering:
                self._cluster(self._rows_seen)
                self._next_clustering *= 2
                continue
            vector = self.index.head(row + 1)[row]
            for level in self._levels:
                if level.centroids is not None:
                    level.assign = _grow_ints(level.assign, row + 1)
                    level.assign[row] = int(np.argmax(level.centroids @ vector))

    def _cluster(self, n: int) -> None:
        """Retrain every level on the first ``n`` prompts and rebuild its sums from the prompts' sums."""
        vectors = self.index.head(n)
        k = self._sums.shape[1]
        for depth, level in enumerate(self._levels):
            count = min(level.count, n // PROMPTS_PER_CLUSTER)
            if count < 2:
                continue
            rng = np.random.default_rng([self.config.cluster_seed, n, depth])
            size = min(n, CLUSTER_SAMPLE_PER_CENTROID * count)
            sample = vectors[np.sort(rng.choice(n, size=size, replace=False))]
            level.centroids = spherical_kmeans(sample, count, KMEANS_ITERATIONS,
                                               self.config.cluster_seed + n + depth)
            level.assign = _grow_ints(np.argmax(vectors @ level.centroids.T, axis=1).astype(np.int64), n)
            level.sums = np.zeros((count, k))
            level.weights = np.zeros((count, k))
            np.add.at(level.sums, level.assign[:n], self._sums[:n])
            np.add.at(level.weights, level.assign[:n], self._weights[:n])

    def _absorb(self, item: ObservationItem) -> None:
        for o in item.observations:
            self._model(o.model)
        row = self.index.row(item.prompt_key)
        self._see_rows(row + 1)
        h = self.config.horizon
        scale = 1.0 if h == 0 else 2.0 ** ((self.applied - self._scale_base) / h)
        clusters = [(level, int(level.assign[row])) for level in self._levels if level.centroids is not None]
        for o in item.observations:
            m = self._model_idx[o.model]
            w = o.weight * scale
            s = w * o.outcome
            self._sums[row, m] += s
            self._weights[row, m] += w
            self._global_sums[m] += s
            self._global_weights[m] += w
            for level, cluster in clusters:
                level.sums[cluster, m] += s
                level.weights[cluster, m] += w
        self.applied += 1
        self.last_feedback_id = item.feedback_id
        if h and self.applied - self._scale_base >= RESCALE_EVERY * h:
            # An exact power of two: every stored value keeps its mantissa, so replay is unaffected.
            shrink = 2.0 ** -RESCALE_EVERY
            for array in (self._sums, self._weights, self._global_sums, self._global_weights,
                          *(a for level in self._levels for a in (level.sums, level.weights))):
                np.multiply(array, shrink, out=array)
            self._scale_base += RESCALE_EVERY * h

    # --------------------------------------------------------------- ranking

    def neighbour_rows(self, embedding: np.ndarray) -> np.ndarray:
        """Index rows of the ``neighbours`` nearest past prompts, most similar first."""
        if len(self.index) == 0:
            return np.empty(0, dtype=np.int64)
        rows, _ = self.index.search_rows(embedding, self.config.neighbours)
        return rows

    def estimate_for(self, embedding: np.ndarray, rows: np.ndarray) -> Estimate:
        """Estimates when the nearest rows (most similar first) are already known."""
        c = self.config
        k = len(self._models)
        f = self._now_factor()
        parent, parent_strength = self._global_estimate()
        g = parent
        unit = np.asarray(embedding, dtype=np.float32)
        unit = unit / max(float(np.linalg.norm(unit)), 1e-12)
        for level in self._levels:
            if level.centroids is None:
                continue
            cluster = int(np.argmax(level.centroids @ unit))
            w = level.weights[cluster, :k] * f
            estimate = (level.sums[cluster, :k] * f + c.cluster_prior * parent) / (w + c.cluster_prior)
            parent_strength = w + np.minimum(c.cluster_prior, parent_strength)
            parent = estimate
        near = rows[: c.neighbours]
        near_s = self._sums[near, :k].sum(axis=0) * f
        near_w = self._weights[near, :k].sum(axis=0) * f
        quality = (near_s + c.local_prior * parent) / (near_w + c.local_prior)
        strength = near_w + np.minimum(c.local_prior, parent_strength)
        return Estimate(quality, strength, parent, g)

    def estimate(self, embedding: np.ndarray) -> Estimate:
        return self.estimate_for(embedding, self.neighbour_rows(embedding))

    def rank(self, embedding: np.ndarray) -> dict[str, float]:
        """Local success-rate estimate of every rated model for a prompt embedding."""
        return dict(zip(self._models, self.estimate(embedding).quality.tolist(), strict=True))

    def route(
        self,
        embedding: np.ndarray,
        candidates: Mapping[str, float],
        budget_usd: float | None,
        willingness_to_pay: float | None,
        live_models: Collection[str],
        request_id: str | None = None,
    ) -> RouteChoice:
        """Pick a model (``candidates``: model -> estimated USD cost); explores only with a request id.

        Candidates never rated score ``prior_quality`` (with the weakest certainty). Raises
        ``NoLiveModelError`` when no candidate is live.
        """
        if not candidates:
            raise ValueError("route needs at least one candidate")
        c = self.config
        est = self.estimate(embedding)
        quality, strength, cluster, glob = {}, {}, {}, {}
        for m in candidates:
            i = self._model_idx.get(m)
            if i is None:
                quality[m] = cluster[m] = glob[m] = c.prior_quality
                strength[m] = strength_bound(c)
            else:
                quality[m], strength[m] = float(est.quality[i]), float(est.strength[i])
                cluster[m], glob[m] = float(est.cluster[i]), float(est.global_[i])
        costs = dict(candidates)
        model, fallbacks, reason = choose(quality, costs, budget_usd, willingness_to_pay, live_models)
        exploratory = False
        if request_id is not None and c.explore_share > 0:
            u, thompson_seed = explore_draw(c.explore_seed, request_id)
            if u < c.explore_share:
                rng = np.random.default_rng(thompson_seed)
                draw = {m: float(rng.beta(max(q, 1e-6) * strength[m], max(1 - q, 1e-6) * strength[m]))
                        for m, q in sorted(quality.items())}
                explored, explored_fallbacks, _ = choose(draw, costs, budget_usd, willingness_to_pay, live_models)
                if explored != model and (budget_usd is None or costs[explored] <= budget_usd):
                    exploratory = True
                    fallbacks = (model, *(f for f in explored_fallbacks if f != model))
                    reason = f"explore: Thompson draw chose {explored} over {model}; " + reason
                    model = explored
        return RouteChoice(model=model, scores=quality, expected_quality=quality, costs=costs, fallbacks=fallbacks,
                           reason=reason, global_scores=glob, local_scores=quality, exploratory=exploratory)

    # ------------------------------------------------------------ persistence

    def snapshot(self) -> dict[str, Any]:
        """JSON-serialisable state (not the index vectors); sparse prompt cells keyed by prompt key."""
        k = len(self._models)
        n = self._rows_seen
        rows, cols = np.nonzero(self._weights[:n, :k])
        keys = self.index.keys
        return {
            "version": SNAPSHOT_VERSION,
            "config": asdict(self.config),
            "models": list(self._models),
            "cells": [[keys[r], col, float(self._sums[r, col]), float(self._weights[r, col])]
                      for r, col in zip(rows.tolist(), cols.tolist(), strict=True)],
            "global_sums": self._global_sums[:k].tolist(),
            "global_weights": self._global_weights[:k].tolist(),
            "levels": [None if level.centroids is None else {
                "centroids": level.centroids.tolist(), "assign": level.assign[:n].tolist(),
                "sums": level.sums[:, :k].tolist(), "weights": level.weights[:, :k].tolist()}
                for level in self._levels],
            "rows_seen": n,
            "next_clustering": self._next_clustering,
            "scale_base": self._scale_base,
            "applied": self.applied,
            "last_feedback_id": self.last_feedback_id,
        }

    @classmethod
    def from_snapshot(cls, data: Mapping[str, Any], index: NeighbourIndex | None = None) -> LocalQualityRanker:
        """Restore a ranker; pass the index rebuilt from stored vectors (keys = prompt keys)."""
        if data.get("version") != SNAPSHOT_VERSION:
            raise ValueError(f"unsupported snapshot version {data.get('version')!r}")
        ranker = cls(LocalQualityConfig(**data["config"]), index)
        ranker.add_models(str(name) for name in data["models"])
        n = int(data["rows_seen"])
        ranker._rows_seen = n
        ranker._sums = _grow(ranker._sums, n, ranker._sums.shape[1])
        ranker._weights = _grow(ranker._weights, n, ranker._weights.shape[1])
        for key, col, s, w in data["cells"]:
            row = ranker.index.row(str(key))
            ranker._sums[row, int(col)] = float(s)
            ranker._weights[row, int(col)] = float(w)
        k = len(ranker._models)
        ranker._global_sums[:k] = np.asarray(data["global_sums"], dtype=np.float64)
        ranker._global_weights[:k] = np.asarray(data["global_weights"], dtype=np.float64)
        for level, stored in zip(ranker._levels, data["levels"], strict=True):
            if stored is None:
                continue
            level.centroids = np.asarray(stored["centroids"], dtype=np.float32)
            level.assign = _grow_ints(np.asarray(stored["assign"], dtype=np.int64), n)
            level.sums = _grow(np.asarray(stored["sums"], dtype=np.float64), 0, ranker._sums.shape[1])
            level.weights = _grow(np.asarray(stored["weights"], dtype=np.float64), 0, ranker._sums.shape[1])
        ranker._next_clustering = int(data["next_clustering"])
        ranker._scale_base = int(data["scale_base"])
        ranker.applied = int(data["applied"])
        ranker.last_feedback_id = data["last_feedback_id"]
        return ranker


def _grow_ints(values: np.ndarray, size: int) -> np.ndarray:
    if size <= len(values):
        return values
    grown = np.zeros(max(size, 2 * len(values)), dtype=np.int64)
    grown[: len(values)] = values
    return grown
