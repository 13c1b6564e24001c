"""The routers the benchmark compares, behind one interface, for any number of models.

Every router implements ``fit(x, outcomes, mask)`` (a full refit; ``outcomes`` is (n, K) in
[0, 1], ``mask`` marks which outcomes were observed: all of them offline, one per prompt under
bandit feedback) and ``predict(x) -> (n, K)`` predicted quality. Each has a three-point grid on
its main capacity knob, tuned the same way by nested cross-validation (``bench/routing_eval.py``):

* ``knn``: mean observed outcome of the k nearest train prompts (cosine), k in {10, 40, 160}
  (RouterBench's kNN); a model unobserved among them gets its train mean.
* ``mlp``: two hidden layers of 100 ReLU units regressing every model's outcome (masked squared
  error), Adam lr 1e-3, batch 256, epochs in {5, 15, 45} (torch; budget in steps, seeded).
* ``svr``: ``LinearSVR`` with epsilon = 0 per model on its observed rows (Eagle paper, App. A.2),
  C in {0.01, 0.1, 1}.
* ``mf``: matrix factorisation, ``P(m answers x) = sigmoid(v_m . (W x) + b_m)`` with d-dimensional
  model vectors, d in {16, 64, 128}, trained on observed outcomes with binary cross-entropy (Adam
  lr 3e-3, 20 epochs, batch 256). RouteLLM's MF scores a pair as ``w . ((v_a - v_b) * W x)``, a
  difference of exactly such per-model linear scores; the pointwise form extends it to K models and
  to bandit feedback, where no pair is observed on the same prompt.
* ``eagle``: Eagle (``core.routing.eagle``) fed one graded comparison per prompt, N in {10, 20, 40},
  ratings mapped to quality by ``core.routing.budget.expected_quality``. With more than two models
  the local table is replayed once in stream order (the paper's reading; 32 shuffled replays of
  N * K(K-1)/2 games per query would cost ~50 ms per decision at twelve models).
* ``local_quality``: the default router (``core.routing.local_quality``), cluster levels in
  {(8), (8, 32), (8, 32, 128)} (the finest topic resolution).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import numpy as np
import torch

from core.routing import (
    EagleConfig,
    EagleRanker,
    FeedbackItem,
    LocalQualityConfig,
    LocalQualityRanker,
    ObservationItem,
    expected_quality,
    from_graded,
)
from core.routing.feedback import Observation
from core.routing.index import NeighbourIndex

BENCH_EAGLE = EagleConfig(neighbours=40)
"""Eagle as the live router ran it before local quality (docs/ROUTING.md)."""
BENCH_LOCAL_QUALITY = LocalQualityConfig(explore_share=0.0)
"""Offline evaluation routes greedily: exploration only matters under bandit feedback."""


class Router(Protocol):
    name: str

    def fit(self, x: np.ndarray, outcomes: np.ndarray, mask: np.ndarray) -> None: ...

    def predict(self, x: np.ndarray) -> np.ndarray: ...


def masked_means(outcomes: np.ndarray, mask: np.ndarray, prior: float = 0.5) -> np.ndarray:
    counts = mask.sum(axis=0)
    sums = np.where(mask, outcomes, 0.0).sum(axis=0)
    out: np.ndarray = np.where(counts > 0, sums / np.maximum(counts, 1), prior)
    return out


def top_rows(train: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """(q, k) rows of the k most similar train vectors per query (exact cosine), most similar first."""
    k = min(k, len(train))
    out = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), 512):
        sims = queries[start:start + 512] @ train.T
        part = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        order = np.take_along_axis(sims, part, axis=1)
        idx = np.lexsort((part, -order), axis=1)
        out[start:start + 512] = np.take_along_axis(part, idx, axis=1)
    return out


class KnnRouter:
    name = "knn"

    def __init__(self, k: int = 40) -> None:
        self.k = k

    def fit(self, x: np.ndarray, outcomes: np.ndarray, mask: np.ndarray) -> None:
        self._x, self._y, self._m = x.astype(np.float32), outcomes, mask
        self._mean = masked_means(outcomes, mask)

    def predict(self, x: np.ndarray) -> np.ndarray:
        rows = top_rows(self._x, x.astype(np.float32), self.k)
        seen = self._m[rows]
        sums = np.where(seen, self._y[rows], 0.0).sum(axis=1)
        counts = seen.sum(axis=1)
        out: np.ndarray = np.where(counts > 0, sums / np.maximum(counts, 1), self._mean)
        return out


class MlpRouter:
    name = "mlp"

    def __init__(self, seed: int, epochs: int = 15, hidden: int = 100) -> None:
        self.seed, self.epochs, self.hidden = seed, epochs, hidden
        self._net: torch.nn.Module | None = None

    def fit(self, x: np.ndarray, outcomes: np.ndarray, mask: np.ndarray) -> None:
        torch.manual_seed(self.seed)
        net = torch.nn.Sequential(torch.nn.Linear(x.shape[1], self.hidden), torch.nn.ReLU(),
                                  torch.nn.Linear(self.hidden, self.hidden), torch.nn.ReLU(),
                                  torch.nn.Linear(self.hidden, outcomes.shape[1]))
        _train(net, x, outcomes, mask, self.epochs, 1e-3, self.seed, lambda out, y: (out - y) ** 2)
        self._net = net

    def predict(self, x: np.ndarray) -> np.ndarray:
        assert self._net is not None, "fit first"
        with torch.no_grad():
            out: np.ndarray = self._net(torch.as_tensor(x, dtype=torch.float32)).numpy().astype(np.float64)
        return out


class SvrRouter:
    name = "svr"

    def __init__(self, seed: int, c: float = 0.1) -> None:
        self.seed, self.c = seed, c
        self._models: list[Any] = []

    def fit(self, x: np.ndarray, outcomes: np.ndarray, mask: np.ndarray) -> None:
        from sklearn.svm import LinearSVR

        self._models = []
        for column in range(outcomes.shape[1]):
            seen = mask[:, column]
            if seen.sum() < 2:
                self._models.append(float(outcomes[seen, column].mean()) if seen.any() else 0.5)
                continue
            model = LinearSVR(epsilon=0.0, C=self.c, dual="auto", max_iter=2000, random_state=self.seed)
            model.fit(x[seen], outcomes[seen, column])
            self._models.append(model)

    def predict(self, x: np.ndarray) -> np.ndarray:
        assert self._models, "fit first"
        return np.stack([np.full(len(x), m) if isinstance(m, float) else m.predict(x) for m in self._models], axis=1)


class MfRouter:
    name = "mf"

    def __init__(self, seed: int, dim: int = 64, epochs: int = 20) -> None:
        self.seed, self.dim, self.epochs = seed, dim, epochs
        self._net: _MfNet | None = None

    def fit(self, x: np.ndarray, outcomes: np.ndarray, mask: np.ndarray) -> None:
        torch.manual_seed(self.seed)
        net = _MfNet(x.shape[1], self.dim, outcomes.shape[1])
        bce = torch.nn.BCEWithLogitsLoss(reduction="none")
        _train(net, x, outcomes, mask, self.epochs, 3e-3, self.seed, bce)
        self._net = net

    def predict(self, x: np.ndarray) -> np.ndarray:
        assert self._net is not None, "fit first"
        with torch.no_grad():
            out: np.ndarray = torch.sigmoid(self._net(torch.as_tensor(x, dtype=torch.float32))).numpy()
        return out.astype(np.float64)


class _MfNet(torch.nn.Module):
    def __init__(self, text_dim: int, dim: int, models: int) -> None:
        super().__init__()
        self.text_proj = torch.nn.Linear(text_dim, dim, bias=False)
        self.models = torch.nn.Linear(dim, models)

    def forward(self, prompt: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.models(self.text_proj(prompt))
        return out


def _train(net: torch.nn.Module, x: np.ndarray, outcomes: np.ndarray, mask: np.ndarray, epochs: int, lr: float,
           seed: int, loss: Any) -> None:
    """Masked minibatch Adam for ``epochs`` epochs of batch 256 (a fixed number of steps)."""
    xs = torch.as_tensor(x, dtype=torch.float32)
    ys = torch.as_tensor(outcomes, dtype=torch.float32)
    ms = torch.as_tensor(mask, dtype=torch.float32)
    optimiser = torch.optim.Adam(net.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(xs), generator=generator)
        for start in range(0, len(xs), 256):
            idx = perm[start:start + 256]
            m = ms[idx]
            per_cell = loss(net(xs[idx]), ys[idx]) * m
            value = per_cell.sum() / m.sum().clamp(min=1.0)
            optimiser.zero_grad()
            value.backward()
            optimiser.step()


def _prompt_key(i: int) -> str:
    return f"p{i}"


class LocalQualityRouter:
    name = "local_quality"

    def __init__(self, config: LocalQualityConfig = BENCH_LOCAL_QUALITY) -> None:
        self.config = config
        self.ranker = LocalQualityRanker(config, NeighbourIndex())
        self._k = 0

    def items(self, x: np.ndarray, outcomes: np.ndarray, mask: np.ndarray, first: int) -> list[ObservationItem]:
        return [ObservationItem(f"f{first + i}", _prompt_key(first + i),
                                tuple(Observation(str(m), float(outcomes[i, m])) for m in np.flatnonzero(mask[i])),
                                x[i]) for i in range(len(x))]

    def fit(self, x: np.ndarray, outcomes: np.ndarray, mask: np.ndarray) -> None:
        self.ranker = LocalQualityRanker(self.config, NeighbourIndex())
        self._k = outcomes.shape[1]
        self.ranker.add_models([str(m) for m in range(self._k)])  # columns in model order
        self.ranker.apply_many(self.items(x, outcomes, mask, 0))

    def update(self, x: np.ndarray, outcomes: np.ndarray, mask: np.ndarray) -> None:
        self.ranker.apply_many(self.items(x, outcomes, mask, len(self.ranker.index)))

    def predict(self, x: np.ndarray) -> np.ndarray:
        rows = self.ranker.index.search_many(x, self.config.neighbours)
        out = np.empty((len(x), self._k))
        for i, r in enumerate(rows):
            out[i] = self.ranker.estimate_for(x[i], r).quality
        return out


class EagleRouter:
    name = "eagle"

    def __init__(self, config: EagleConfig = BENCH_EAGLE) -> None:
        self.config = config
        self.ranker = EagleRanker(config, NeighbourIndex())
        self._k = 0

    def items(self, x: np.ndarray, outcomes: np.ndarray, mask: np.ndarray, first: int) -> list[FeedbackItem]:
        return [FeedbackItem(f"f{first + i}", _prompt_key(first + i),
                             from_graded({str(m): float(outcomes[i, m]) for m in np.flatnonzero(mask[i])}), x[i])
                for i in range(len(x))]

    def fit(self, x: np.ndarray, outcomes: np.ndarray, mask: np.ndarray) -> None:
        config = self.config
        if outcomes.shape[1] > 2 and config.local_order == "shuffled":
            config = dataclasses.replace(config, local_order="stream")
        self.ranker = EagleRanker(config, NeighbourIndex())
        self._k = outcomes.shape[1]
        self.ranker.apply_many(self.items(x, outcomes, mask, 0))

    def update(self, x: np.ndarray, outcomes: np.ndarray, mask: np.ndarray) -> None:
        self.ranker.apply_many(self.items(x, outcomes, mask, len(self.ranker.index)))

    def predict(self, x: np.ndarray) -> np.ndarray:
        ranker = self.ranker
        rows = ranker.index.search_many(x, ranker.config.neighbours)
        names = [str(m) for m in range(self._k)]
        out = np.empty((len(x), self._k))
        for i, r in enumerate(rows):
            keys = [ranker.index.key(int(j)) for j in r]
            quality = expected_quality(ranker.scores_for_neighbours(keys), ranker.config.scale)
            out[i] = [quality.get(m, ranker.config.pool_quality) for m in names]
        return out


def grid(name: str, seed: int) -> list[tuple[dict[str, Any], Router]]:
    """The three configurations of router ``name`` that nested cross-validation chooses from."""
    if name == "knn":
        return [({"k": k}, KnnRouter(k)) for k in (10, 40, 160)]
    if name == "mlp":
        return [({"epochs": e}, MlpRouter(seed, epochs=e)) for e in (5, 15, 45)]
    if name == "svr":
        return [({"C": c}, SvrRouter(seed, c=c)) for c in (0.01, 0.1, 1.0)]
    if name == "mf":
        return [({"dim": d}, MfRouter(seed, dim=d)) for d in (16, 64, 128)]
    if name == "eagle":
        return [({"neighbours": n}, EagleRouter(dataclasses.replace(BENCH_EAGLE, neighbours=n))) for n in (10, 20, 40)]
    if name == "local_quality":
        return [({"clusters": list(c)}, LocalQualityRouter(dataclasses.replace(BENCH_LOCAL_QUALITY, clusters=c)))
                for c in ((8,), (8, 32), (8, 32, 128))]
    raise ValueError(f"unknown router {name!r}")


LEARNED = ("knn", "mlp", "svr", "mf")
ROUTERS = ("local_quality", "eagle", *LEARNED)
