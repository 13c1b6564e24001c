"""An online reward model learned from users' feedback: Bradley–Terry on pairwise preferences plus
logistic regression on ratings, thumbs and implicit signals, over frozen features of (prompt,
response), with a rolling held-out split that says how far to trust it.

Model. A response's score is ``s(x) = w · φ(x) + b`` and its reward ``2σ(s) − 1`` in (−1, 1), the
scale of the rewards users' feedback gives (``core.rewards``).

* pairwise, a preferred to b:  P(a ≻ b) = σ(s_a − s_b) = σ(w · (φ_a − φ_b))   (Bradley–Terry; a tie
  is the target ½);
* pointwise, a graded response: P(good) = σ(w · φ + b), target = the rating r in [0, 1], thumbs
  1 / 0, implicit ``accept`` 1 and ``regenerate`` / ``edit`` 0 at the router's weights (½, ¼);
  ``dwell`` is engagement, not quality, and teaches nothing.

Both share ``w``, so preferences and grades train one scorer. Training is AdaGrad on the logistic
loss with L2, one step per new example plus ``replay`` steps on earlier ones drawn from a bounded
buffer by a generator seeded with the example count: the state is a pure function of the ordered
example stream (same stream, same weights, bit for bit).

Held-out accuracy. An example is held out (never trained on) when the hash of its id falls in
the held-out share. Accuracy is measured on the newest ``heldout_window`` held-out examples with
the current weights: a prediction is right when the logit has the label's sign, strictly (ties,
target ½, do not count). Pairwise examples count as they are (there is no bias a constant answer
could exploit); pointwise ones are *balanced* over the two classes (the mean of the accuracy on
good and on bad answers, and only once both classes were held out), so a model that calls every
answer good scores ½ however many thumbs are up. The two parts are averaged weighted by their
counts. The model may score responses only while at least ``min_heldout`` held-out examples
count and the accuracy, less ``confidence_z`` standard errors (sqrt(a(1 − a)/n)), is at least
``min_accuracy`` (:meth:`RewardModel.usable`): on a few dozen held-out examples the estimate moves
by ±0.05–0.09, and a model no better than a coin must not pass on a lucky window.

Per model. The responses the model scores are one model's rollouts, so what must be measured is
whether it tells *that model's* good answers from its bad ones. Each example records the model
all its responses came from (its ``scope``; "" for a comparison across models), and the gate for
scoring model m's rollouts is the accuracy on held-out examples of scope m only. A preference
between two different models teaches the scorer, but cannot open a gate: on real answers such
preferences are mostly learnt from which model wrote them (``flywheel bench reward-model``).

Features (:func:`response_features`): the response embedding, the elementwise product of prompt
and response embeddings (scaled so its entries are as large as the embedding's), their cosine,
and cheap text statistics (log length, empty answer, repeated words, share of non-alphanumeric
characters).
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

IMPLICIT_LABELS = {"accept": (1.0, 0.5), "regenerate": (0.0, 0.5), "edit": (0.0, 0.25)}
"""Implicit signal -> (target, weight), the weights the router gives the same signals."""
TEXT_FEATURES = 5
WORD = re.compile(r"\w+")


@dataclass(frozen=True)
class RewardModelConfig:
    dim: int
    """Length of a response's feature vector (``feature_dim(embedding_dim)``)."""
    learning_rate: float = 0.2
    """AdaGrad step size."""
    l2: float = 1e-3
    """L2 penalty on the weights (not the bias)."""
    replay: int = 4
    """Extra steps on earlier training examples after each new one (sample efficiency)."""
    buffer: int = 1000
    """Training examples kept for replay (the newest)."""
    heldout_share: float = 0.2
    """Share of examples held out for accuracy (chosen by a hash of the example id)."""
    heldout_window: int = 200
    """Accuracy is measured on this many newest held-out examples."""
    min_heldout: int = 30
    """Below this many held-out examples accuracy is unknown and the model is not used."""
    min_accuracy: float = 0.65
    """The model scores responses only while its held-out accuracy (less ``confidence_z`` standard
    errors) is at least this."""
    confidence_z: float = 2.0
    """Standard errors taken off the measured accuracy before comparing it with ``min_accuracy``."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.dim < 1:
            raise ValueError(f"dim must be >= 1, got {self.dim}")
        if self.learning_rate <= 0 or self.l2 < 0:
            raise ValueError(f"learning_rate must be > 0 and l2 >= 0, got {self.learning_rate}, {self.l2}")
        if self.replay < 0 or self.buffer < 1:
            raise ValueError(f"replay must be >= 0 and buffer >= 1, got {self.replay}, {self.buffer}")
        if not 0.0 < self.heldout_share < 1.0:
            raise ValueError(f"heldout_share must be in (0, 1), got {self.heldout_share}")
        if self.heldout_window < 1 or not 1 <= self.min_heldout <= self.heldout_window:
            raise ValueError(f"need 1 <= min_heldout ({self.min_heldout}) <= heldout_window "
                             f"({self.heldout_window})")
        if not 0.0 <= self.min_accuracy <= 1.0 or self.confidence_z < 0:
            raise ValueError(f"min_accuracy must be in [0, 1] and confidence_z >= 0, got {self.min_accuracy}, "
                             f"{self.confidence_z}")


# ------------------------------------------------------------------------------ labels
@dataclass(frozen=True)
class Label:
    """What one feedback event says about response quality, before features are attached.

    ``pairwise``: ``request_ids`` = (a, b) and ``target`` = P(a preferred) (1, 0 or ½ for a tie);
    ``pointwise``: ``request_ids`` = (r,) and ``target`` = P(r is good).
    """

    kind: Literal["pairwise", "pointwise"]
    request_ids: tuple[str, ...]
    target: float
    weight: float = 1.0


def label_of(feedback: Mapping[str, Any]) -> Label | None:
    """The label a Feedback event carries (None: nothing about quality, e.g. dwell time).

    Raises ValueError for feedback that breaks its contract (the rewarder has already
    dead-lettered such events by then, so this is a guard)."""
    kind, rid = feedback["kind"], str(feedback["request_id"])
    if kind == "pairwise":
        pair = feedback.get("pairwise") or {}
        if pair.get("winner") not in ("a", "b", "tie"):
            raise ValueError(f"pairwise feedback with winner {pair.get('winner')!r}")
        target = {"a": 1.0, "b": 0.0, "tie": 0.5}[pair["winner"]]
        return Label("pairwise", (str(pair["request_id_a"]), str(pair["request_id_b"])), target)
    if kind == "rating":
        rating = feedback.get("rating")
        if rating is None or not 0.0 <= rating <= 1.0:
            raise ValueError(f"rating {rating!r} outside [0, 1]")
        return Label("pointwise", (rid,), float(rating))
    if kind == "thumbs":
        if feedback.get("thumbs_up") is None:
            raise ValueError("thumbs feedback without thumbs_up")
        return Label("pointwise", (rid,), 1.0 if feedback["thumbs_up"] else 0.0)
    if kind == "implicit":
        signal = (feedback.get("implicit") or {}).get("signal")
        if signal == "dwell":
            return None
        if signal not in IMPLICIT_LABELS:
            raise ValueError(f"unknown implicit signal {signal!r}")
        target, weight = IMPLICIT_LABELS[signal]
        return Label("pointwise", (rid,), target, weight)
    raise ValueError(f"unknown feedback kind {kind!r}")


# ------------------------------------------------------------------------------ features
def feature_dim(embedding_dim: int) -> int:
    return 2 * embedding_dim + 1 + TEXT_FEATURES


def text_statistics(text: str) -> np.ndarray:
    """Cheap, length-like features of a response (each roughly in [0, 1])."""
    words = WORD.findall(text.lower())
    stripped = text.strip()
    repeated = 1.0 - len(set(words)) / len(words) if words else 0.0
    symbols = sum(1 for c in stripped if not (c.isalnum() or c.isspace())) / max(1, len(stripped))
    return np.array([math.log1p(len(stripped)) / 8.0, float(not stripped), repeated, symbols,
                     min(len(words), 200) / 200.0], dtype=np.float32)


def response_features(prompt_embeddings: np.ndarray, response_embeddings: np.ndarray,
                      responses: list[str]) -> np.ndarray:
    """φ for each (prompt, response) pair: unit-norm embeddings in, ``(n, feature_dim)`` out."""
    if not (len(prompt_embeddings) == len(response_embeddings) == len(responses)):
        raise ValueError(f"{len(prompt_embeddings)} prompts, {len(response_embeddings)} responses and "
                         f"{len(responses)} texts do not line up")
    dim = response_embeddings.shape[1] if response_embeddings.ndim == 2 else 0
    product = prompt_embeddings * response_embeddings
    cosine = product.sum(axis=1, keepdims=True)
    stats = np.stack([text_statistics(t) for t in responses]) if responses else np.zeros((0, TEXT_FEATURES))
    return np.concatenate([response_embeddings, product * math.sqrt(max(dim, 1)), cosine, stats],
                          axis=1).astype(np.float32)


# ------------------------------------------------------------------------------ the model
@dataclass(frozen=True)
class Example:
    """One training or held-out example: a label with the features of its responses."""

    example_id: str
    label: Label
    features: np.ndarray
    """pointwise: φ(response); pairwise: φ(a) − φ(b)."""
    scope: str = ""
    """The model every response of the example came from ("" when several or unknown)."""

    @classmethod
    def of(cls, example_id: str, label: Label, response_features: list[np.ndarray],
           models: list[str] | None = None) -> Example:
        if len(response_features) != len(label.request_ids):
            raise ValueError(f"{label.kind} label needs {len(label.request_ids)} feature vectors, "
                             f"got {len(response_features)}")
        x = response_features[0] - response_features[1] if label.kind == "pairwise" else response_features[0]
        return cls(example_id, label, np.asarray(x, dtype=np.float32), scope_of(models or []))


def scope_of(models: list[str]) -> str:
    """The one model behind all of an example's responses, or "" (a cross-model comparison)."""
    return models[0] if models and all(m == models[0] for m in models) else ""


def is_heldout(example_id: str, share: float) -> bool:
    digest = hashlib.sha256(example_id.encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < share


@dataclass(frozen=True)
class Accuracy:
    balanced: float | None
    """Balanced held-out accuracy, None while fewer than ``min_heldout`` held-out examples."""
    heldout: int
    """Held-out examples it was measured on."""

    def lower_bound(self, z: float) -> float | None:
        """The accuracy less ``z`` standard errors (None while unknown)."""
        if self.balanced is None:
            return None
        return self.balanced - z * math.sqrt(self.balanced * (1.0 - self.balanced) / max(1, self.heldout))


class RewardModel:
    def __init__(self, config: RewardModelConfig) -> None:
        self.config = config
        self.weights = np.zeros(config.dim + 1, dtype=np.float64)  # last entry: the pointwise bias
        self.grad_sq = np.zeros(config.dim + 1, dtype=np.float64)
        self.train_buffer: deque[Example] = deque(maxlen=config.buffer)
        self.heldout: deque[Example] = deque(maxlen=config.heldout_window)
        self.seen = 0
        self.trained = 0

    # -- scoring ---------------------------------------------------------------------------------
    def _augmented(self, example: Example) -> np.ndarray:
        bias = 0.0 if example.label.kind == "pairwise" else 1.0
        return np.append(example.features.astype(np.float64), bias)

    def logit(self, example: Example) -> float:
        return float(self._augmented(example) @ self.weights)

    def scores(self, features: np.ndarray) -> np.ndarray:
        """s(x) = w · φ(x) + b for each row of ``features``."""
        return np.asarray(features, dtype=np.float64) @ self.weights[:-1] + self.weights[-1]

    def rewards(self, features: np.ndarray) -> np.ndarray:
        """Expected reward 2σ(s) − 1 in (−1, 1) for each row of ``features``."""
        return np.tanh(self.scores(features) / 2.0)  # = 2σ(s) − 1

    # -- learning --------------------------------------------------------------------------------
    def _step(self, example: Example) -> None:
        x = self._augmented(example)
        p = 1.0 / (1.0 + math.exp(-max(-30.0, min(30.0, float(x @ self.weights)))))
        grad = example.label.weight * (p - example.label.target) * x
        grad[:-1] += self.config.l2 * self.weights[:-1]
        self.grad_sq += grad * grad
        self.weights -= self.config.learning_rate * grad / (np.sqrt(self.grad_sq) + 1e-8)

    def update(self, example: Example) -> bool:
        """Fold one example in (stream order); True when it was trained on, False when held out."""
        if example.features.shape != (self.config.dim,):
            raise ValueError(f"example {example.example_id} has features of shape {example.features.shape}, "
                             f"expected ({self.config.dim},)")
        self.seen += 1
        if is_heldout(example.example_id, self.config.heldout_share):
            self.heldout.append(example)
            return False
        self._step(example)
        if self.train_buffer and self.config.replay:
            rng = np.random.default_rng([self.config.seed, self.seen])
            for i in rng.integers(0, len(self.train_buffer), size=self.config.replay):
                self._step(self.train_buffer[int(i)])
        self.train_buffer.append(example)
        self.trained += 1
        return True

    def fit(self, examples: Iterable[Example]) -> None:
        for example in examples:
            self.update(example)

    # -- trust -----------------------------------------------------------------------------------
    def accuracy(self, scope: str | None = None) -> Accuracy:
        """Held-out accuracy with the current weights (see the module docstring); with ``scope``,
        on the held-out examples whose responses all came from that model only."""
        parts: list[tuple[float, int]] = []
        counted = [e for e in self.heldout if e.label.target != 0.5 and scope in (None, e.scope)]
        pairs = [e for e in counted if e.label.kind == "pairwise"]
        if pairs:
            parts.append((sum(self._correct(e) for e in pairs) / len(pairs), len(pairs)))
        points = [e for e in counted if e.label.kind == "pointwise"]
        good = [self._correct(e) for e in points if e.label.target > 0.5]
        bad = [self._correct(e) for e in points if e.label.target < 0.5]
        if good and bad:  # one class alone says nothing a constant could not
            parts.append(((sum(good) / len(good) + sum(bad) / len(bad)) / 2, len(points)))
        n = sum(count for _, count in parts)
        if n < self.config.min_heldout:
            return Accuracy(None, n)
        return Accuracy(sum(acc * count for acc, count in parts) / n, n)

    def _correct(self, example: Example) -> bool:
        """The logit has the label's sign, strictly (an undecided model is wrong, never lucky)."""
        logit = self.logit(example)
        return logit > 0 if example.label.target > 0.5 else logit < 0

    def usable(self, scope: str | None = None) -> bool:
        """Whether the model may score responses (of the model ``scope``; see the module docstring)."""
        lower = self.accuracy(scope).lower_bound(self.config.confidence_z)
        return lower is not None and lower >= self.config.min_accuracy

    def scopes(self) -> list[str]:
        """The models among the held-out examples (sorted)."""
        return sorted({e.scope for e in self.heldout if e.scope})

    # -- persistence -----------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """JSON-serialisable state; the examples themselves are referenced by id (the caller keeps
        them), so a restored model continues exactly as this one would."""
        return {"weights": self.weights.tolist(), "grad_sq": self.grad_sq.tolist(), "seen": self.seen,
                "trained": self.trained, "train_buffer": [e.example_id for e in self.train_buffer],
                "heldout": [e.example_id for e in self.heldout]}

    @classmethod
    def restore(cls, config: RewardModelConfig, state: Mapping[str, Any],
                examples: Mapping[str, Example]) -> RewardModel:
        """The model :meth:`state` described; ``examples`` must hold every example id it names."""
        model = cls(config)
        weights = np.asarray(state["weights"], dtype=np.float64)
        if weights.shape != model.weights.shape:
            raise ValueError(f"state has {weights.shape[0]} weights, the config needs {model.weights.shape[0]}")
        model.weights, model.grad_sq = weights, np.asarray(state["grad_sq"], dtype=np.float64)
        model.seen, model.trained = int(state["seen"]), int(state["trained"])
        missing = [i for i in [*state["train_buffer"], *state["heldout"]] if i not in examples]
        if missing:
            raise ValueError(f"state names {len(missing)} examples that were not given, e.g. {missing[0]}")
        model.train_buffer.extend(examples[i] for i in state["train_buffer"])
        model.heldout.extend(examples[i] for i in state["heldout"])
        return model
