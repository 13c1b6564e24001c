"""The learned baselines Eagle is compared with, all on the same prompt embeddings.

Every router implements ``fit(X, correct)`` (full refit; ``correct`` is the (n, 2) 0/1 matrix for
(weak, strong)) and ``predict(X) -> (n, 2)`` predicted quality:

* ``knn``: RouterBench's kNN, mean correctness of the k = 40 nearest train prompts (cosine).
* ``mlp``: two hidden layers of 100 ReLU units regressing both models' correctness
  (scikit-learn, Adam, early stopping on 10% of the *train* split).
* ``svr``: ``LinearSVR`` with epsilon = 0, one regressor per model (Eagle paper, App. A.2).
* ``mf``: RouteLLM's matrix factorisation: ``logit P(a beats b) = w^T ((v_a/|v_a| - v_b/|v_b|) *
  (W x))`` with 128-d model vectors, trained like RouteLLM on decisive comparisons only
  (ties dropped), Adam lr 3e-4, weight decay 1e-5, batch 64, Gaussian input noise 0.1. Its
  win probability p is mapped to a quality gap as ``d * (2p - 1)`` where d is the train
  share of decisive comparisons (P(win) - P(loss) = P(decisive) * (2p - 1)).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch


class LearnedRouter(Protocol):
    name: str

    def fit(self, x: np.ndarray, correct: np.ndarray) -> None: ...

    def predict(self, x: np.ndarray) -> np.ndarray: ...


class _SklearnRouter:
    """A router around one fitted scikit-learn regressor (set ``_model`` in ``fit``)."""

    _model: object | None = None

    def predict(self, x: np.ndarray) -> np.ndarray:
        assert self._model is not None, "fit first"
        out: np.ndarray = self._model.predict(x)  # type: ignore[attr-defined]
        return out


class KnnRouter(_SklearnRouter):
    name = "knn"

    def __init__(self, k: int = 40) -> None:
        self.k = k

    def fit(self, x: np.ndarray, correct: np.ndarray) -> None:
        from sklearn.neighbors import KNeighborsRegressor

        model = KNeighborsRegressor(n_neighbors=self.k, metric="cosine", algorithm="brute")
        model.fit(x, correct)
        self._model = model


class MlpRouter(_SklearnRouter):
    name = "mlp"

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def fit(self, x: np.ndarray, correct: np.ndarray) -> None:
        from sklearn.neural_network import MLPRegressor

        model = MLPRegressor(hidden_layer_sizes=(100, 100), activation="relu", early_stopping=True,
                             max_iter=200, random_state=self.seed)
        model.fit(x, correct)
        self._model = model


class SvrRouter:
    name = "svr"

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._models: list[object] = []

    def fit(self, x: np.ndarray, correct: np.ndarray) -> None:
        from sklearn.svm import LinearSVR

        self._models = []
        for column in range(correct.shape[1]):
            model = LinearSVR(epsilon=0.0, dual="auto", max_iter=5000, random_state=self.seed)
            model.fit(x, correct[:, column])
            self._models.append(model)

    def predict(self, x: np.ndarray) -> np.ndarray:
        assert self._models, "fit first"
        return np.stack([m.predict(x) for m in self._models], axis=1)  # type: ignore[attr-defined]


class MfRouter:
    name = "mf"

    def __init__(self, seed: int, dim: int = 128, epochs: int = 100, noise: float = 0.1) -> None:
        self.seed = seed
        self.dim = dim
        self.epochs = epochs
        self.noise = noise
        self._net: object | None = None
        self._decisive_share = 0.0

    def fit(self, x: np.ndarray, correct: np.ndarray) -> None:
        torch.manual_seed(self.seed)
        gain = correct[:, 1] - correct[:, 0]
        decisive = gain != 0
        self._decisive_share = float(decisive.mean())
        # Orient every decisive game as (winner, loser), as RouteLLM's PairwiseDataset does.
        winner = torch.as_tensor((gain[decisive] > 0).astype(np.int64))
        loser = 1 - winner
        prompts = torch.as_tensor(x[decisive], dtype=torch.float32)
        net = _MfNet(x.shape[1], self.dim)
        optimiser = torch.optim.Adam(net.parameters(), lr=3e-4, weight_decay=1e-5)
        loss_fn = torch.nn.BCEWithLogitsLoss()
        generator = torch.Generator().manual_seed(self.seed)
        n = len(prompts)
        for _ in range(self.epochs):
            perm = torch.randperm(n, generator=generator)
            for start in range(0, n, 64):
                idx = perm[start: start + 64]
                noisy = prompts[idx] + torch.randn(len(idx), prompts.shape[1], generator=generator) * self.noise
                logits = net(winner[idx], loser[idx], noisy)
                loss = loss_fn(logits, torch.ones_like(logits))
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
        self._net = net

    def predict(self, x: np.ndarray) -> np.ndarray:
        assert isinstance(self._net, _MfNet), "fit first"
        with torch.no_grad():
            strong = torch.ones(len(x), dtype=torch.int64)
            logits = self._net(strong, 1 - strong, torch.as_tensor(x, dtype=torch.float32))
            p_strong = torch.sigmoid(logits).numpy().astype(np.float64)
        gap = self._decisive_share * (2.0 * p_strong - 1.0)
        return np.stack([0.5 - gap / 2.0, 0.5 + gap / 2.0], axis=1)


class _MfNet(torch.nn.Module):
    def __init__(self, text_dim: int, dim: int, num_models: int = 2) -> None:
        super().__init__()
        self.models = torch.nn.Embedding(num_models, dim)
        self.text_proj = torch.nn.Linear(text_dim, dim, bias=False)
        self.classifier = torch.nn.Linear(dim, 1, bias=False)

    def forward(self, win: torch.Tensor, lose: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
        normalise = torch.nn.functional.normalize
        diff = normalise(self.models(win), dim=1) - normalise(self.models(lose), dim=1)
        out: torch.Tensor = self.classifier(diff * self.text_proj(prompt)).squeeze(-1)
        return out


def make_baselines(seed: int) -> list[LearnedRouter]:
    return [KnnRouter(), MlpRouter(seed), SvrRouter(seed), MfRouter(seed)]
