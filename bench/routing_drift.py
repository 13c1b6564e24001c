"""Online routing with drift: one model's quality changes on one subject group halfway through.

Protocol (all routers see the same stream, the same embeddings and full feedback):

1. The stream is ``stream_len`` MMLU prompts in a seeded random order. The first ``warmup``
   are history: every router starts fitted on them.
2. From ``warmup`` on, each prompt is routed by expected quality alone (no budget: the
   question is which model answers better), then its outcome for *both* models is revealed
   as feedback (one pairwise comparison, as in the Eagle paper's online setting).
3. Drift: halfway through the online part, the strong model degrades to chance (correct with
   probability 0.25, four-choice MMLU) on the drift group (all ``high_school_*`` subjects,
   about a quarter of MMLU) for the rest of the stream. The weak model is unchanged.
4. Updates: Eagle variants absorb each feedback item as it arrives (incremental ELO).
   The learned baselines refit from scratch on all feedback so far every ``refit_every``
   prompts, the usual way to run models that have no incremental update. ``knn_online``
   (k-NN over all feedback so far, updated per item) is an extra reference showing what an
   always-current lazy learner achieves; it is not one of the issue's baselines.

Regret of a decision is ``max(outcome) - outcome of the chosen model`` on that prompt;
``regret_after_drift`` is its mean over every prompt after the drift point (lower is better;
``regret_after_drift_group`` restricts to the drifted group).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bench.routing_baselines import make_baselines
from bench.routing_data import STRONG, WEAK, RoutingData
from core.routing import EagleConfig, EagleRanker, FeedbackItem, expected_quality, from_graded
from core.routing.index import NeighbourIndex

DRIFT_GROUP_PREFIX = "high_school_"
DEGRADED_ACCURACY = 0.25


@dataclass(frozen=True)
class DriftStream:
    rows: np.ndarray
    """Data-set row of each stream position."""
    outcomes: np.ndarray
    """(len, 2) 0/1 outcomes after drift is applied."""
    in_group: np.ndarray
    drift_at: int
    warmup: int


def make_stream(data: RoutingData, seed: int, stream_len: int, warmup: int) -> DriftStream:
    rng = np.random.default_rng([seed, 2])
    rows = rng.permutation(len(data))[: min(stream_len, len(data))]
    group_ids = [i for i, name in enumerate(data.group_names) if name.startswith(DRIFT_GROUP_PREFIX)]
    in_group = np.isin(data.groups[rows], group_ids)
    outcomes = data.correct[rows].copy()
    drift_at = warmup + (len(rows) - warmup) // 2
    degraded = rng.random(len(rows)) < DEGRADED_ACCURACY
    after = np.arange(len(rows)) >= drift_at
    mask = after & in_group
    outcomes[mask, 1] = degraded[mask].astype(np.float64)
    return DriftStream(rows=rows, outcomes=outcomes, in_group=in_group, drift_at=drift_at, warmup=warmup)


def _item(stream: DriftStream, pos: int, x: np.ndarray) -> FeedbackItem:
    y = stream.outcomes[pos]
    return FeedbackItem(f"d{pos}", f"r{stream.rows[pos]}", from_graded({WEAK: y[0], STRONG: y[1]}), x)


def _eagle_choices(config: EagleConfig, stream: DriftStream, x: np.ndarray) -> np.ndarray:
    ranker = EagleRanker(config, NeighbourIndex())
    for pos in range(stream.warmup):
        ranker.apply(_item(stream, pos, x[pos]))
    choices = np.zeros(len(stream.rows), dtype=np.int64)
    for pos in range(stream.warmup, len(stream.rows)):
        quality = expected_quality(ranker.rank(x[pos]), config.scale)
        choices[pos] = 1 if quality.get(STRONG, 0.0) > quality.get(WEAK, 0.0) else 0
        ranker.apply(_item(stream, pos, x[pos]))
    return choices


def _periodic_choices(router_index: int, seed: int, stream: DriftStream, x: np.ndarray,
                      refit_every: int) -> np.ndarray:
    choices = np.zeros(len(stream.rows), dtype=np.int64)
    for start in range(stream.warmup, len(stream.rows), refit_every):
        router = make_baselines(seed)[router_index]
        router.fit(x[:start], stream.outcomes[:start])
        end = min(start + refit_every, len(stream.rows))
        predicted = router.predict(x[start:end])
        choices[start:end] = (predicted[:, 1] > predicted[:, 0]).astype(np.int64)
    return choices


def _knn_online_choices(stream: DriftStream, x: np.ndarray, k: int = 40) -> np.ndarray:
    choices = np.zeros(len(stream.rows), dtype=np.int64)
    for pos in range(stream.warmup, len(stream.rows)):
        sims = x[:pos] @ x[pos]
        near = np.argpartition(-sims, k - 1)[:k]
        mean = stream.outcomes[near].mean(axis=0)
        choices[pos] = 1 if mean[1] > mean[0] else 0
    return choices


def run_drift(
    data: RoutingData,
    embeddings: np.ndarray,
    eagle_configs: dict[str, EagleConfig],
    seed: int,
    stream_len: int = 8000,
    warmup: int = 1000,
    refit_every: int = 1000,
) -> dict[str, dict[str, float]]:
    stream = make_stream(data, seed, stream_len, warmup)
    x = embeddings[stream.rows]
    choices: dict[str, np.ndarray] = {}
    for name, config in eagle_configs.items():
        choices[name] = _eagle_choices(config, stream, x)
    for i, router in enumerate(make_baselines(seed)):
        choices[router.name] = _periodic_choices(i, seed, stream, x, refit_every)
    choices["knn_online"] = _knn_online_choices(stream, x)
    n = len(stream.rows)
    rng = np.random.default_rng([seed, 3])
    choices["random"] = rng.integers(0, 2, size=n)
    choices["strong"] = np.ones(n, dtype=np.int64)
    choices["weak"] = np.zeros(n, dtype=np.int64)

    positions = np.arange(n)
    after = positions >= stream.drift_at
    before = (positions >= stream.warmup) & ~after
    best = stream.outcomes.max(axis=1)
    out: dict[str, dict[str, float]] = {}
    for name, chosen in choices.items():
        regret = best - stream.outcomes[positions, chosen]
        out[name] = {
            "regret_after_drift": float(regret[after].mean()),
            "regret_after_drift_group": float(regret[after & stream.in_group].mean()),
            "regret_before_drift": float(regret[before].mean()),
        }
    return out


def drift_setup(data: RoutingData, seed: int, stream_len: int, warmup: int) -> dict[str, float | int | str]:
    stream = make_stream(data, seed, stream_len, warmup)
    return {
        "stream_len": len(stream.rows), "warmup": warmup, "drift_at": stream.drift_at,
        "group": DRIFT_GROUP_PREFIX + "*", "group_share": float(stream.in_group.mean()),
        "strong_accuracy_on_group_after_drift": DEGRADED_ACCURACY,
    }
