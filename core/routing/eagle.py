"""Eagle (arXiv 2409.15518): training-free global + local ELO ranking of a model fleet.

* **Global**: one ELO table over every comparison ever applied, in stream order.
* **Local**: for a query, copy the global table and replay the comparisons recorded for the
  ``neighbours`` nearest past prompts (cosine over embeddings).
* **Score** = ``global_weight * global + (1 - global_weight) * local``.

State and determinism. The ranker's state (global ratings, per-prompt comparison history,
feedback count) is a pure function of the ordered feedback stream: :meth:`EagleRanker.apply`
does fixed-order float arithmetic only, so replaying the stream from an empty ranker reproduces
:meth:`snapshot` exactly. The nearest-neighbour index is kept apart (the agent rebuilds it from
stored vectors with ``NeighbourIndex.add``); it is deterministic too (see ``index.py``).

Two gaps the paper leaves open, and the rules chosen here (docs/ROUTING.md has the evidence):

* **"Average ELO" for the global table.** Sequential ELO with K = 32 remembers only the last
  few dozen games, so its final state is noisy. The global table used for scoring is the
  running mean of the sequential ratings over the feedback items (an exponential moving
  average once ``global_horizon`` items have been seen, so it still follows drift).
  ``global_horizon = 0`` uses the last sequential state, the paper's literal reading.
* **Order of the local replay.** ELO is order dependent and the short memory means the last
  ~10 replayed games dominate. ``local_order="shuffled"`` replays the neighbours' games in
  ``local_orders`` fixed pseudo-random orders (seeded by ``order_seed`` and the number of
  games, so replay is deterministic) and averages the results, giving every neighbour an
  equal expected say. ``"stream"`` replays them once in feedback order (newest last).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Collection, Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

from core.routing.budget import RouteChoice, choose, expected_quality
from core.routing.elo import Comparison
from core.routing.feedback import FeedbackItem
from core.routing.index import NeighbourIndex

SNAPSHOT_VERSION = 1


@dataclass(frozen=True)
class EagleConfig:
    k: float = 32.0
    """ELO step size K (paper: 32)."""
    scale: float = 400.0
    """ELO logistic scale: a 400-point gap means 10:1 expected odds."""
    neighbours: int = 20
    """N, the number of nearest past prompts replayed for the local ranking (paper: 20)."""
    global_weight: float = 0.5
    """P in P*global + (1-P)*local (paper: 0.5); 1 = Eagle-Global, 0 = Eagle-Local."""
    initial_rating: float = 1000.0
    """Rating a model starts with; only differences matter, so any shared value ranks the same."""
    local_order: Literal["shuffled", "stream"] = "shuffled"
    """Replay order of the neighbours' comparisons (see the module docstring)."""
    local_orders: int = 32
    """R, the number of shuffled replays averaged when ``local_order`` is ``"shuffled"``."""
    order_seed: int = 0
    """Seed of the shuffled replay orders (fixed, so ratings replay exactly)."""
    global_horizon: int = 1000
    """Feedback items averaged into the global table (EMA horizon); 0 = last sequential state."""
    pool_quality: float = 0.5
    """Mean quality of the pool, the anchor of the rating -> quality map (decision-neutral)."""

    def __post_init__(self) -> None:
        if not (self.k > 0 and self.scale > 0 and self.neighbours >= 1):
            raise ValueError(f"need k > 0, scale > 0, neighbours >= 1; got k={self.k} "
                             f"scale={self.scale} neighbours={self.neighbours}")
        if not 0.0 <= self.global_weight <= 1.0:
            raise ValueError(f"global_weight must be within [0, 1], got {self.global_weight}")
        if self.local_order not in ("shuffled", "stream"):
            raise ValueError(f"local_order must be 'shuffled' or 'stream', got {self.local_order!r}")
        if self.local_orders < 1 or self.global_horizon < 0:
            raise ValueError(f"need local_orders >= 1 and global_horizon >= 0; got "
                             f"local_orders={self.local_orders} global_horizon={self.global_horizon}")
        if not math.isfinite(self.initial_rating):
            raise ValueError(f"initial_rating must be finite, got {self.initial_rating}")


# One stored game: (stream sequence number, model index a, model index b, score of a, weight).
_Game = tuple[int, int, int, float, float]


class EagleRanker:
    """Global + local ELO over a feedback stream; see the module docstring for invariants."""

    def __init__(self, config: EagleConfig | None = None, index: NeighbourIndex | None = None) -> None:
        self.config = config or EagleConfig()
        self.index = index if index is not None else NeighbourIndex()
        self._models: list[str] = []
        self._model_idx: dict[str, int] = {}
        self._live: list[float] = []
        """Sequential ELO state after the last comparison."""
        self._global: list[float] = []
        """The averaged global table used for scoring (see ``global_horizon``)."""
        self._history: dict[str, list[_Game]] = {}
        self._seq = 0
        self.applied = 0
        """Number of feedback items applied (the agent stores its stream offset beside it)."""
        self.last_feedback_id: str | None = None

    # ----------------------------------------------------------------- state

    @property
    def models(self) -> tuple[str, ...]:
        """Rated models in order of first appearance in the stream."""
        return tuple(self._models)

    def global_ratings(self) -> dict[str, float]:
        """The global table used for scoring (averaged sequential ELO)."""
        return dict(zip(self._models, self._global, strict=True))

    def sequential_ratings(self) -> dict[str, float]:
        """Plain sequential ELO after the last comparison (the paper's literal global state)."""
        return dict(zip(self._models, self._live, strict=True))

    def history(self, prompt_key: str) -> list[Comparison]:
        """The comparisons recorded for one prompt, in stream order."""
        return [Comparison(self._models[a], self._models[b], s, w)
                for _, a, b, s, w in self._history.get(prompt_key, [])]

    def _model(self, name: str) -> int:
        idx = self._model_idx.get(name)
        if idx is None:
            idx = len(self._models)
            self._models.append(name)
            self._model_idx[name] = idx
            self._live.append(self.config.initial_rating)
            self._global.append(self.config.initial_rating)
        return idx

    def apply(self, feedback: FeedbackItem) -> None:
        """Absorb one feedback item: global ELO on its comparisons, history and index append."""
        self.apply_many((feedback,))

    def apply_many(self, items: Iterable[FeedbackItem]) -> None:
        """Absorb items in order; same state as applying them one by one, but one index append.

        All-or-nothing on bad input: every prompt must have a known embedding (or carry one)
        and every vector must be valid before anything changes.
        """
        batch = list(items)
        new_keys: list[str] = []
        new_vectors: list[np.ndarray] = []
        pending: set[str] = set()
        for item in batch:
            key = item.prompt_key
            if key in pending or key in self.index:
                continue
            if item.embedding is None:
                raise ValueError(f"feedback {item.feedback_id!r}: prompt {key!r} has no known "
                                 "embedding; send it with the first feedback for that prompt")
            pending.add(key)
            new_keys.append(key)
            new_vectors.append(np.asarray(item.embedding))
        if new_keys:
            self.index.add(new_keys, np.stack(new_vectors))
        for item in batch:
            self._absorb(item)

    def _absorb(self, feedback: FeedbackItem) -> None:
        k, scale = self.config.k, self.config.scale
        games = self._history.setdefault(feedback.prompt_key, [])
        ratings = self._live
        for c in feedback.comparisons:
            a, b = self._model(c.a), self._model(c.b)
            ra, rb = ratings[a], ratings[b]
            delta = c.weight * k * (c.score_a - 1.0 / (1.0 + 10.0 ** ((rb - ra) / scale)))
            ratings[a] = ra + delta
            ratings[b] = rb - delta
            games.append((self._seq, a, b, c.score_a, c.weight))
            self._seq += 1
        self.applied += 1
        self.last_feedback_id = feedback.feedback_id
        horizon = self.config.global_horizon
        if horizon == 0:
            self._global = list(ratings)
            return
        rate = max(1.0 / self.applied, 1.0 / horizon)
        averaged = self._global
        for i, live in enumerate(ratings):
            averaged[i] += rate * (live - averaged[i])

    # --------------------------------------------------------------- ranking

    def neighbour_keys(self, embedding: np.ndarray) -> list[str]:
        """Prompt keys of the N nearest past prompts, most similar first."""
        if len(self.index) == 0:
            return []
        return self.index.search(embedding, self.config.neighbours)

    def local_ratings(self, neighbour_keys: list[str]) -> list[float]:
        """Global ratings with the given neighbours' comparisons replayed (model-index order)."""
        games: list[_Game] = []
        for key in neighbour_keys:
            games.extend(self._history.get(key, ()))
        games.sort()  # canonical stream order, whatever order the neighbours came in
        if self.config.local_order == "stream":
            return _replay(self._global, games, self.config.k, self.config.scale)
        orders = replay_orders(self.config.order_seed, len(games), self.config.local_orders)
        total = [0.0] * len(self._global)
        for order in orders:
            replayed = _replay(self._global, [games[j] for j in order], self.config.k, self.config.scale)
            for i, r in enumerate(replayed):
                total[i] += r
        return [t / len(orders) for t in total]

    def scores_for_neighbours(self, neighbour_keys: list[str]) -> dict[str, float]:
        """Combined scores when the neighbours are already known (the benchmark batches search)."""
        p = self.config.global_weight
        local = self.local_ratings(neighbour_keys) if p < 1.0 else self._global
        return {m: p * g + (1.0 - p) * loc
                for m, g, loc in zip(self._models, self._global, local, strict=True)}

    def rank(self, embedding: np.ndarray) -> dict[str, float]:
        """Combined Eagle score of every rated model for a prompt embedding."""
        keys = self.neighbour_keys(embedding) if self.config.global_weight < 1.0 else []
        return self.scores_for_neighbours(keys)

    def route(
        self,
        embedding: np.ndarray,
        candidates: Mapping[str, float],
        budget_usd: float | None,
        willingness_to_pay: float | None,
        live_models: Collection[str],
    ) -> RouteChoice:
        """Pick a model for a prompt; ``candidates`` maps model -> estimated USD cost.

        Candidates never seen in feedback score ``initial_rating``. Raises
        ``NoLiveModelError`` when no candidate is live.
        """
        if not candidates:
            raise ValueError("route needs at least one candidate")
        # One ranking pass: the decision record's global and local ratings come from it too.
        p = self.config.global_weight
        keys = self.neighbour_keys(embedding) if p < 1.0 else []
        local = self.local_ratings(keys) if p < 1.0 else self._global
        initial = self.config.initial_rating
        glob = dict(zip(self._models, self._global, strict=True))
        loc = dict(zip(self._models, local, strict=True))
        global_scores = {m: glob.get(m, initial) for m in candidates}
        local_scores = {m: loc.get(m, initial) for m in candidates}
        scores = {m: p * global_scores[m] + (1.0 - p) * local_scores[m] if m in glob else initial
                  for m in candidates}
        quality = expected_quality(scores, self.config.scale, self.config.pool_quality)
        costs = dict(candidates)
        model, fallbacks, reason = choose(quality, costs, budget_usd, willingness_to_pay, live_models)
        return RouteChoice(model=model, scores=scores, expected_quality=quality, costs=costs,
                           fallbacks=fallbacks, reason=reason, global_scores=global_scores,
                           local_scores=local_scores)

    # ------------------------------------------------------------ persistence

    def snapshot(self) -> dict[str, Any]:
        """JSON-serialisable state (not the index vectors); floats round-trip exactly via json."""
        return {
            "version": SNAPSHOT_VERSION,
            "config": asdict(self.config),
            "models": list(self._models),
            "live": list(self._live),
            "global": list(self._global),
            "history": {key: [list(g) for g in games] for key, games in self._history.items()},
            "seq": self._seq,
            "applied": self.applied,
            "last_feedback_id": self.last_feedback_id,
        }

    @classmethod
    def from_snapshot(cls, data: Mapping[str, Any], index: NeighbourIndex | None = None) -> EagleRanker:
        """Restore a ranker; pass the index rebuilt from stored vectors (keys = prompt keys)."""
        if data.get("version") != SNAPSHOT_VERSION:
            raise ValueError(f"unsupported snapshot version {data.get('version')!r}")
        ranker = cls(EagleConfig(**data["config"]), index)
        for name in data["models"]:
            ranker._model(name)
        ranker._live = [float(r) for r in data["live"]]
        ranker._global = [float(r) for r in data["global"]]
        ranker._history = {
            key: [(int(q), int(a), int(b), float(s), float(w)) for q, a, b, s, w in games]
            for key, games in data["history"].items()
        }
        ranker._seq = int(data["seq"])
        ranker.applied = int(data["applied"])
        ranker.last_feedback_id = data["last_feedback_id"]
        return ranker


def _replay(start: list[float], games: list[_Game], k: float, scale: float) -> list[float]:
    """Sequential ELO over ``games`` from a copy of ``start`` (same arithmetic as ``apply``)."""
    ratings = list(start)
    for _, a, b, s, w in games:
        ra, rb = ratings[a], ratings[b]
        delta = w * k * (s - 1.0 / (1.0 + 10.0 ** ((rb - ra) / scale)))
        ratings[a] = ra + delta
        ratings[b] = rb - delta
    return ratings


@functools.lru_cache(maxsize=1024)
def replay_orders(seed: int, games: int, orders: int) -> tuple[tuple[int, ...], ...]:
    """``orders`` fixed permutations of ``range(games)``: a pure function of its arguments."""
    rng = np.random.default_rng([seed, games])
    return tuple(tuple(int(j) for j in rng.permutation(games)) for _ in range(orders))
