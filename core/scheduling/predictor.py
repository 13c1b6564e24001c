"""UELLM's resource profiler: predict a request's output-length bucket from its prompt, online.

UELLM fine-tunes ChatGLM3-6B to classify the answer length of a question into power-of-two
buckets [0,8), [8,16), ..., [1024,2048). That is far too heavy to sit in front of a 135M model on
a CPU, so this profiler keeps the *task* (same buckets, predicted from the prompt, learning from
every completed response) and swaps the model for one that costs microseconds: hashed word
uni/bi-gram features plus a few length features, fed to a multinomial logistic regression
trained by AdaGrad SGD one example at a time. It can be warm-started with ``fit`` on logged
(prompt, output length) pairs and keeps learning from ``observe``.

Two numbers come out of a prediction. ``bucket`` (the arg-max class) is what UELLM reports
accuracy on. ``tokens`` is the expected length, sum_k p_k * rep_k, where rep_k is the running
mean of the lengths actually seen in bucket k: the expectation minimises squared error, so it
orders jobs better than a bucket's fixed midpoint. Schedulers use ``tokens``.

Accuracy is *prequential*: each observed example is first predicted, scored, then learned,
so the reported accuracy is always on data the model had not seen.
"""

from __future__ import annotations

import math
import re
import zlib
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from core.scheduling.length import LengthDistribution

_TOKEN_RE = re.compile(r"[a-z]+|\d+(?:\.\d+)?|[^\sa-z\d]")


@dataclass(frozen=True)
class PredictorConfig:
    n_hash: int = 1 << 16
    """Width of the hashed n-gram feature space (collisions are rare below ~10k distinct n-grams)."""
    min_log2: int = 3
    """The first bucket is [0, 2**min_log2); UELLM starts at [0, 8)."""
    max_log2: int = 11
    """The last bucket is [2**(max_log2-1), inf); UELLM ends at [1024, 2048)."""
    learning_rate: float = 0.1
    """AdaGrad base step size."""
    l2: float = 1e-5
    """L2 shrinkage applied to the touched weights at each step."""
    accuracy_window: int = 500
    """How many recent observations the windowed accuracy covers."""

    def __post_init__(self) -> None:
        if self.n_hash < 16:
            raise ValueError(f"n_hash={self.n_hash} must be >= 16")
        if not 1 <= self.min_log2 < self.max_log2 <= 20:
            raise ValueError(f"need 1 <= min_log2 < max_log2 <= 20, got {self.min_log2}, {self.max_log2}")
        if self.learning_rate <= 0 or self.l2 < 0:
            raise ValueError(f"learning_rate={self.learning_rate} must be > 0 and l2={self.l2} >= 0")

    @property
    def n_buckets(self) -> int:
        return self.max_log2 - self.min_log2 + 1


def bucket_of(length: int, cfg: PredictorConfig) -> int:
    """Index of the power-of-two bucket holding ``length`` (bucket 0 is [0, 2**min_log2))."""
    if length < (1 << cfg.min_log2):
        return 0
    return min(math.floor(math.log2(length)) - cfg.min_log2 + 1, cfg.n_buckets - 1)


def bucket_bounds(k: int, cfg: PredictorConfig) -> tuple[int, int]:
    """[lo, hi) of bucket ``k``; the last bucket's hi is 2**max_log2 for representation only."""
    lo = 0 if k == 0 else 1 << (cfg.min_log2 + k - 1)
    hi = 1 << (cfg.min_log2 + k)
    return lo, hi


@dataclass(frozen=True)
class LengthPrediction:
    bucket: int
    tokens: float
    """Expected output length in tokens (probability-weighted bucket representatives)."""
    probs: tuple[float, ...]
    distribution: LengthDistribution | None = None
    """The bucket probabilities as a length distribution (uniform inside each bucket)."""


def bucket_distribution(probs: Sequence[float], cfg: PredictorConfig) -> LengthDistribution:
    """One uniform segment per bucket, [max(lo, 1), hi]; lengths are at least one token."""
    pieces = []
    for k, p in enumerate(probs):
        lo, hi = bucket_bounds(k, cfg)
        pieces.append((float(max(lo, 1)), float(hi), float(p)))
    return LengthDistribution.from_pieces(pieces)


def _hash(text: str, n: int) -> int:
    # crc32 is stable across processes (Python's hash() is salted per process).
    return zlib.crc32(text.encode()) % n


def featurize(prompt: str, n_hash: int) -> tuple[NDArray[np.int64], NDArray[np.float32]]:
    """Sparse features (indices into a space of n_hash + 4, values), duplicates summed.

    Hashed: word unigrams and bigrams (numbers collapsed to their digit count, so "$18" and
    "$27" share a feature). Dense (the last 4 slots): bias, log prompt length in words, share
    of numeric tokens, count of question marks. Unigram values are scaled by 1/sqrt(#tokens)
    so long prompts do not dominate the step size.
    """
    toks = [f"<num{min(len(t), 6)}>" if t[0].isdigit() else t for t in _TOKEN_RE.findall(prompt.lower())]
    n = max(len(toks), 1)
    idx: list[int] = []
    val: list[float] = []
    scale = 1.0 / math.sqrt(n)
    prev = "<s>"
    for t in toks:
        idx.append(_hash("u:" + t, n_hash))
        val.append(scale)
        idx.append(_hash("b:" + prev + " " + t, n_hash))
        val.append(scale)
        prev = t
    n_num = sum(1 for t in toks if t.startswith("<num"))
    dense = [1.0, math.log1p(n) / 5.0, n_num / n, min(prompt.count("?"), 5) / 5.0]
    for j, v in enumerate(dense):
        idx.append(n_hash + j)
        val.append(v)
    uniq, inverse = np.unique(np.asarray(idx, dtype=np.int64), return_inverse=True)
    summed = np.zeros(len(uniq), dtype=np.float32)
    np.add.at(summed, inverse, np.asarray(val, dtype=np.float32))
    return uniq, summed


class LengthPredictor:
    """Online multinomial logistic regression over power-of-two output-length buckets."""

    def __init__(self, config: PredictorConfig | None = None) -> None:
        self.config = config or PredictorConfig()
        k, d = self.config.n_buckets, self.config.n_hash + 4
        self._w = np.zeros((k, d), dtype=np.float32)
        self._g = np.full((k, d), 1e-6, dtype=np.float32)  # AdaGrad squared-gradient sums
        self._rep_sum = np.zeros(k, dtype=np.float64)
        self._rep_n = np.zeros(k, dtype=np.float64)
        self._hits: deque[bool] = deque(maxlen=self.config.accuracy_window)
        self.observed = 0
        self.correct = 0

    # --- prediction -----------------------------------------------------------------------
    def representatives(self) -> NDArray[np.float64]:
        """Per-bucket representative length: mean of seen lengths, else the geometric midpoint."""
        reps = np.empty(self.config.n_buckets, dtype=np.float64)
        for k in range(self.config.n_buckets):
            if self._rep_n[k] > 0:
                reps[k] = self._rep_sum[k] / self._rep_n[k]
            else:
                lo, hi = bucket_bounds(k, self.config)
                reps[k] = math.sqrt(max(lo, 1) * hi)
        return reps

    def _probs(self, idx: NDArray[np.int64], val: NDArray[np.float32]) -> NDArray[np.float64]:
        z = (self._w[:, idx] @ val).astype(np.float64)
        z -= z.max()
        e = np.exp(z)
        return np.asarray(e / e.sum(), dtype=np.float64)

    def predict(self, prompt: str) -> LengthPrediction:
        p = self._probs(*featurize(prompt, self.config.n_hash))
        probs = tuple(p.tolist())
        return LengthPrediction(bucket=int(np.argmax(p)), tokens=float(p @ self.representatives()), probs=probs,
                                distribution=bucket_distribution(probs, self.config))

    # --- learning ---------------------------------------------------------------------------
    def _learn(self, idx: NDArray[np.int64], val: NDArray[np.float32], p: NDArray[np.float64],
               y: int) -> None:
        cfg = self.config
        err = p.astype(np.float32)
        err[y] -= 1.0
        grad = np.outer(err, val) + cfg.l2 * self._w[:, idx]
        self._g[:, idx] += grad * grad
        self._w[:, idx] -= cfg.learning_rate * grad / np.sqrt(self._g[:, idx])

    def _record_length(self, length: int) -> int:
        y = bucket_of(length, self.config)
        self._rep_sum[y] += length
        self._rep_n[y] += 1
        return y

    def observe(self, prompt: str, output_tokens: int) -> bool:
        """Score the prediction for a finished request, then learn from it. Returns whether it was right."""
        idx, val = featurize(prompt, self.config.n_hash)
        p = self._probs(idx, val)
        y = bucket_of(output_tokens, self.config)
        hit = int(np.argmax(p)) == y
        self._hits.append(hit)
        self.observed += 1
        self.correct += int(hit)
        self._record_length(output_tokens)
        self._learn(idx, val, p, y)
        return hit

    def fit(self, pairs: Sequence[tuple[str, int]], epochs: int = 2, seed: int = 0) -> None:
        """Warm start on logged (prompt, output tokens) pairs; does not touch the online accuracy."""
        if epochs < 1:
            raise ValueError(f"epochs={epochs} must be >= 1")
        feats = [featurize(p, self.config.n_hash) for p, _ in pairs]
        for _, n in pairs:
            self._record_length(n)
        labels = [bucket_of(n, self.config) for _, n in pairs]
        rng = np.random.default_rng(seed)
        for _ in range(epochs):
            for i in rng.permutation(len(pairs)):
                idx, val = feats[i]
                self._learn(idx, val, self._probs(idx, val), labels[i])

    # --- reporting --------------------------------------------------------------------------
    @property
    def accuracy(self) -> float:
        """Prequential bucket accuracy over all observations (nan before the first)."""
        return self.correct / self.observed if self.observed else float("nan")

    @property
    def recent_accuracy(self) -> float:
        """Prequential bucket accuracy over the last ``accuracy_window`` observations."""
        return sum(self._hits) / len(self._hits) if self._hits else float("nan")


@dataclass(frozen=True)
class PredictorReport:
    accuracy: float
    """Share of exact bucket hits."""
    within_one: float
    """Share within one bucket of the truth."""
    majority_accuracy: float
    """Accuracy of always predicting the most common bucket (the floor to beat)."""
    mae_tokens: float
    """Mean absolute error of the expected-length estimate."""
    n: int


def evaluate(predictor: LengthPredictor, pairs: Iterable[tuple[str, int]]) -> PredictorReport:
    """Score a predictor on held-out pairs without learning from them."""
    cfg = predictor.config
    truth: list[int] = []
    pred: list[int] = []
    err: list[float] = []
    for prompt, n in pairs:
        p = predictor.predict(prompt)
        truth.append(bucket_of(n, cfg))
        pred.append(p.bucket)
        err.append(abs(p.tokens - n))
    if not truth:
        raise ValueError("evaluate() needs at least one pair")
    t, q = np.asarray(truth), np.asarray(pred)
    majority = np.bincount(t, minlength=cfg.n_buckets).max() / len(t)
    return PredictorReport(
        accuracy=float((t == q).mean()),
        within_one=float((np.abs(t - q) <= 1).mean()),
        majority_accuracy=float(majority),
        mae_tokens=float(np.mean(err)),
        n=len(t),
    )
