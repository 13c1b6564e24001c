"""Local quality: each model's success rate near the prompt, shrunk towards wider evidence.

Flywheel's default router (docs/ROUTING.md has the evaluation that chose it over Eagle). For a
prompt with embedding ``x`` and each model ``m``:

* **global** ``g_m = (S_m + c_g * q0) / (W_m + c_g)`` over all feedback for ``m``;
* **topic** ``t_m = (S^wide_m + c_w * g_m) / (W^wide_m + c_w)`` over the ``wide_neighbours``
  nearest past prompts (a data-driven topic: no labels needed);
* **local** ``q_m = (S^near_m + c_n * t_m) / (W^near_m + c_n)`` over the ``neighbours`` nearest,

where ``S`` / ``W`` are sums of outcome x weight / weight of the observations recorded on those
prompts. ``q_m`` is a probability that ``m`` answers well, so ``lambda * q - cost`` is directly
meaningful (no rating-to-quality map), and a model nobody has rated near ``x`` falls back to its
topic, then global, then prior rate ``q0``. Each level's estimate counts as ``W + min(c, n_parent)``
observations, so a prior is never more certain than the level it comes from; that count is the
posterior's strength for exploration.

**Feedback.** Every kind of feedback is an :class:`Observation` (model, outcome in [0, 1],
weight): a thumbs vote or a rating observes the model that answered, a pairwise preference
observes both models (winner 1, loser 0, tie 0.5), graded scores observe every model scored.
Unlike pool-relative ELO, one bandit observation moves its own model by ``weight / (W + c)``.

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
are fixed-order float additions, and the index is deterministic (``index.py``). Replaying the
stream from an empty ranker reproduces :meth:`snapshot` exactly.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Iterable, Mapping
from dataclasses import asdict, dataclass

import numpy as np

from core.routing.budget import RouteChoice, choose
from core.routing.feedback import ObservationItem
from core.routing.index import NeighbourIndex

SNAPSHOT_VERSION = 1
RESCALE_EVERY = 256
"""Half-lives between exact power-of-two rescales of the stored weights (2**256 fits a double)."""


@dataclass(frozen=True)
class LocalQualityConfig:
    neighbours: int = 20
    """Nearest past prompts in the local estimate."""
    wide_neighbours: int = 200
    """Nearest past prompts in the topic-level estimate (>= ``neighbours``)."""
    local_prior: float = 4.0
    """c_n: pseudo-observations of the topic estimate in the local one."""
    wide_prior: float = 8.0
    """c_w: pseudo-observations of the global estimate in the topic one."""
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

    def __post_init__(self) -> None:
        if not 1 <= self.neighbours <= self.wide_neighbours:
            raise ValueError(f"need 1 <= neighbours <= wide_neighbours; got {self.neighbours}, "
                             f"{self.wide_neighbours}")
        if min(self.local_prior, self.wide_prior, self.global_prior) <= 0:
            raise ValueError(f"priors must be > 0; got local={self.local_prior} wide={self.wide_prior} "
                             f"global={self.global_prior}")
        if not 0.0 < self.prior_quality < 1.0:
            raise ValueError(f"prior_quality must be within (0, 1), got {self.prior_quality}")
        if self.horizon < 0:
            raise ValueError(f"horizon must be >= 0, got {self.horizon}")
        if not 0.0 <= self.explore_share <= 1.0:
            raise ValueError(f"explore_share must be within [0, 1], got {self.explore_share}")


@dataclass(frozen=True)
class Estimate:
    """Per-model estimates for one prompt (model order of the ranker)."""

    quality: np.ndarray
    """Local posterior mean q_m."""
    strength: np.ndarray
    """Pseudo-observations behind q_m (the Beta posterior's alpha + beta)."""
    topic: np.ndarray
    global_: np.ndarray


def explore_draw(seed: int, request_id: str) -> tuple[float, int]:
    """(u in [0, 1), Thompson seed): a pure function of the seed and the request id."""
    digest = hashlib.sha256(f"{seed}:{request_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64, int.from_bytes(digest[8:16], "big")


class _Columns:
    """A growable (rows x models) float64 matrix pair of weighted outcome sums and weights."""

    def __init__(self) -> None:
        self.sums = np.zeros((64, 4))
        self.weights = np.zeros((64, 4))

    def ensure(self, rows: int, models: int) -> None:
        r, m = self.sums.shape
        if rows <= r and models <= m:
            return
        shape = (max(rows, 2 * r) if rows > r else r, max(models, 2 * m) if models > m else m)
        for name in ("sums", "weights"):
            grown = np.zeros(shape)
            old = getattr(self, name)
            grown[: old.shape[0], : old.shape[1]] = old
            setattr(self, name, grown)


class LocalQualityRanker:
    """Local/topic/global success-rate estimates over a feedback stream (see the module docstring)."""

    def __init__(self, config: LocalQualityConfig | None = None, index: NeighbourIndex | None = None) -> None:
        self.config = config or LocalQualityConfig()
        self.index = index if index is not None else NeighbourIndex()
        self._models: list[str] = []
        self._model_idx: dict[str, int] = {}
        self._rows = _Columns()
        self._global_sums: list[float] = []
        self._global_weights: list[float] = []
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
            self._global_sums.append(0.0)
            self._global_weights.append(0.0)
        return idx

    def _now_factor(self) -> float:
        """Stored weight x this factor = weight as of now (1 when there is no decay)."""
        h = self.config.horizon
        return 1.0 if h == 0 else 2.0 ** (-(self.applied - self._scale_base) / h)

    def global_ratings(self) -> dict[str, float]:
        """Each model's global success-rate estimate ``g_m`` (the decision record's global rating)."""
        return dict(zip(self._models, self._global_estimate().tolist(), strict=True))

    def _global_estimate(self) -> np.ndarray:
        c = self.config
        f = self._now_factor()
        s = np.asarray(self._global_sums) * f
        w = np.asarray(self._global_weights) * f
        out: np.ndarray = (s + c.global_prior * c.prior_quality) / (w + c.global_prior)
        return out

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

    def _absorb(self, item: ObservationItem) -> None:
        for o in item.observations:
            self._model(o.model)
        row = self.index.row(item.prompt_key)
        self._rows.ensure(len(self.index), len(self._models))
        h = self.config.horizon
        scale = 1.0 if h == 0 else 2.0 ** ((self.applied - self._scale_base) / h)
        sums, weights = self._rows.sums, self._rows.weights
        for o in item.observations:
            m = self._model_idx[o.model]
            w = o.weight * scale
            sums[row, m] += w * o.outcome
            weights[row, m] += w
            self._global_sums[m] += w * o.outcome
            self._global_weights[m] += w
        self.applied += 1
        self.last_feedback_id = item.feedback_id
        if h and self.applied - self._scale_base >= RESCALE_EVERY * h:
            # An exact power of two: every stored value keeps its mantissa, so replay is unaffected.
            shrink = 2.0 ** -RESCALE_EVERY
            self._rows.sums *= shrink
            self._rows.weights *= shrink
            self._global_sums = [v * shrink for v in self._global_sums]
            self._global_weights = [v * shrink for v in self._global_weights]
            self._scale_base += RESCALE_EVERY * h

    # --------------------------------------------------------------- ranking

    def neighbour_rows(self, embedding: np.ndarray) -> np.ndarray:
        """Index rows of the ``wide_neighbours`` nearest past prompts, most similar first."""
        if len(self.index) == 0:
            return np.empty(0, dtype=np.int64)
        rows, _ = self.index.search_rows(embedding, self.config.wide_neighbours)
        return rows

    def estimate_for_rows(self, rows: np.ndarray) -> Estimate:
        """Estimates when the nearest rows (most similar first) are already known."""
        c = self.config
        k = len(self._models)
        f = self._now_factor()
        g = self._global_estimate()
        g_strength = np.asarray(self._global_weights) * f + c.global_prior
        near = rows[: c.neighbours]
        sums, weights = self._rows.sums[:, :k], self._rows.weights[:, :k]
        wide_s, wide_w = sums[rows].sum(axis=0) * f, weights[rows].sum(axis=0) * f
        near_s, near_w = sums[near].sum(axis=0) * f, weights[near].sum(axis=0) * f
        topic = (wide_s + c.wide_prior * g) / (wide_w + c.wide_prior)
        topic_strength = wide_w + np.minimum(c.wide_prior, g_strength)
        quality = (near_s + c.local_prior * topic) / (near_w + c.local_prior)
        strength = near_w + np.minimum(c.local_prior, topic_strength)
        return Estimate(quality, strength, topic, g)

    def estimate(self, embedding: np.ndarray) -> Estimate:
        return self.estimate_for_rows(self.neighbour_rows(embedding))

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
        quality, strength, topic, glob = {}, {}, {}, {}
        for m in candidates:
            i = self._model_idx.get(m)
            if i is None:
                quality[m] = topic[m] = glob[m] = c.prior_quality
                strength[m] = strength_bound(c)
            else:
                quality[m], strength[m] = float(est.quality[i]), float(est.strength[i])
                topic[m], glob[m] = float(est.topic[i]), float(est.global_[i])
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

    def snapshot(self) -> dict[str, object]:
        """JSON-serialisable state (not the index vectors); sparse rows keyed by prompt key."""
        k = len(self._models)
        n = len(self.index)
        sums, weights = self._rows.sums[:n, :k], self._rows.weights[:n, :k]
        rows, cols = np.nonzero(weights)
        keys = self.index.keys
        return {
            "version": SNAPSHOT_VERSION,
            "config": asdict(self.config),
            "models": list(self._models),
            "cells": [[keys[r], c, float(sums[r, c]), float(weights[r, c])]
                      for r, c in zip(rows.tolist(), cols.tolist(), strict=True)],
            "global_sums": list(self._global_sums),
            "global_weights": list(self._global_weights),
            "scale_base": self._scale_base,
            "applied": self.applied,
            "last_feedback_id": self.last_feedback_id,
        }

    @classmethod
    def from_snapshot(cls, data: Mapping[str, object], index: NeighbourIndex | None = None) -> LocalQualityRanker:
        """Restore a ranker; pass the index rebuilt from stored vectors (keys = prompt keys)."""
        if data.get("version") != SNAPSHOT_VERSION:
            raise ValueError(f"unsupported snapshot version {data.get('version')!r}")
        ranker = cls(LocalQualityConfig(**data["config"]), index)  # type: ignore[arg-type]
        for name in data["models"]:  # type: ignore[attr-defined]
            ranker._model(str(name))
        ranker._rows.ensure(len(ranker.index), len(ranker._models))
        for key, col, s, w in data["cells"]:  # type: ignore[attr-defined]
            row = ranker.index.row(str(key))
            ranker._rows.sums[row, int(col)] = float(s)
            ranker._rows.weights[row, int(col)] = float(w)
        ranker._global_sums = [float(v) for v in data["global_sums"]]  # type: ignore[attr-defined]
        ranker._global_weights = [float(v) for v in data["global_weights"]]  # type: ignore[attr-defined]
        ranker._scale_base = int(data["scale_base"])  # type: ignore[call-overload]
        ranker.applied = int(data["applied"])  # type: ignore[call-overload]
        ranker.last_feedback_id = data["last_feedback_id"]  # type: ignore[assignment]
        return ranker


def strength_bound(config: LocalQualityConfig) -> float:
    """The posterior strength of a model nobody has rated (the weakest certainty)."""
    return min(config.local_prior, config.wide_prior, config.global_prior)


