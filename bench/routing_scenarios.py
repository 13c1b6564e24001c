"""Four scenarios, one replay protocol: drift, a new model, sparse feedback, adversarial feedback.

Protocol (every router sees the same stream, embeddings and feedback; docs/bench/routing.md):

1. The stream is ``stream_len`` rows of one data set in a seeded order. The first ``warmup``
   (at most a fifth of the stream, so small data sets work) are history with every model's
   outcome; every router starts fitted on it.
2. From ``warmup`` on, each prompt is routed by predicted quality alone (ties: cheaper), and only
   the chosen model's outcome comes back (bandit feedback, as live thumbs and ratings).
   ``local_quality`` and ``eagle`` absorb it at once through the live feedback rules
   (``core.routing.state``: a ``rating`` event); the learned baselines refit on everything observed
   so far every ``refit_every`` prompts, with the configuration the offline evaluation chose.
3. The event is at ``event_at``, halfway through the online part:
   * ``drift``: the best single model's outcomes on the stream's largest topic drop to chance
     (correct with probability 0.25) from ``event_at`` on;
   * ``new_model``: the best single model is absent (no candidate, no history) before
     ``event_at`` and joins then, with no history (as a freshly trained version would);
   * ``sparse_feedback``: only 10 % of decisions get feedback, throughout;
   * ``adversarial_feedback``: 5 % of feedback reports the opposite outcome, throughout.
4. Regret of a decision = best available outcome - the chosen model's (true outcomes).
   ``regret_after`` is its mean from ``event_at`` on; ``regret_curve`` is its mean per tenth of
   the online part. Per router: mean and [min, max] over ``seeds`` seeds.

``local_quality`` runs with its live exploration (the exploration draw is seeded by a request id
per position); ``local_quality_greedy`` is the same router without exploration, which isolates
what exploration does, and ``local_quality_recency`` the same with a 1,000-item half-life.
"""

from __future__ import annotations

import dataclasses
import itertools
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

from bench.routing_baselines import BENCH_EAGLE, LEARNED, grid
from bench.routing_data import RoutingData
from core.routing import EagleConfig, LocalQualityConfig, LocalQualityRanker
from core.routing.state import RouterFeedback, RouterState

SCENARIOS = ("drift", "new_model", "sparse_feedback", "adversarial_feedback")
DEGRADED_ACCURACY = 0.25
SPARSE_SHARE = 0.10
ADVERSARIAL_SHARE = 0.05
LIVE_LOCAL_QUALITY = LocalQualityConfig()
RECENCY_HORIZON = 1000
"""Half-life (feedback items) of the ``local_quality_recency`` variant, which shows what forgetting buys."""


@dataclass(frozen=True)
class Stream:
    rows: np.ndarray
    outcomes: np.ndarray
    """(L, K) true outcomes after the scenario's change."""
    available: np.ndarray
    """(L, K) bool: which models can be chosen at each position."""
    gets_feedback: np.ndarray
    flipped: np.ndarray
    warmup: int
    event_at: int
    focus: int
    """The drifting / joining model's column."""


def make_stream(data: RoutingData, scenario: str, seed: int, stream_len: int, warmup: int) -> Stream:
    rng = np.random.default_rng([seed, SCENARIOS.index(scenario), 17])
    rows = rng.permutation(len(data))[: min(stream_len, len(data))]
    n = len(rows)
    warmup = max(1, min(warmup, n // 5))
    event_at = warmup + (n - warmup) // 2
    outcomes = data.correct[rows].copy()
    focus = int(np.argmax(outcomes[:warmup].mean(axis=0)))
    available = np.ones_like(outcomes, dtype=bool)
    gets_feedback = np.ones(n, dtype=bool)
    flipped = np.zeros(n, dtype=bool)
    after = np.arange(n) >= event_at
    if scenario == "drift":
        topics = data.groups[rows]
        largest = int(np.bincount(topics).argmax())
        hit = after & (topics == largest)
        outcomes[hit, focus] = (rng.random(int(hit.sum())) < DEGRADED_ACCURACY).astype(np.float64)
    elif scenario == "new_model":
        available[~after, focus] = False
    elif scenario == "sparse_feedback":
        gets_feedback = rng.random(n) < SPARSE_SHARE
    elif scenario == "adversarial_feedback":
        flipped = rng.random(n) < ADVERSARIAL_SHARE
    else:
        raise ValueError(f"unknown scenario {scenario!r}")
    return Stream(rows, outcomes, available, gets_feedback, flipped, warmup, event_at, focus)


def _pick(predicted: np.ndarray, expected_cost: np.ndarray, available: np.ndarray) -> int:
    value = np.where(available, predicted, -np.inf)
    best = value.max()
    return int(np.where(value >= best, expected_cost, np.inf).argmin())


def _state_choices(config: EagleConfig | LocalQualityConfig, stream: Stream, data: RoutingData, x: np.ndarray,
                   expected_cost: np.ndarray, explore: bool) -> tuple[np.ndarray, np.ndarray]:
    """Choices of a live ranker fed through ``RouterState`` (the agent's rules); and which explored."""
    names = [f"m{j}" for j in range(data.k)]
    state = RouterState(config, names)
    if isinstance(state.ranker, LocalQualityRanker):
        state.ranker.add_models(names)
    fid = 0

    def feed(pos: int, model: int, outcome: float) -> None:
        nonlocal fid
        key = f"r{stream.rows[pos]}"
        new = key not in state.ranker.index
        state.apply(RouterFeedback(f"f{fid}", key, "rating", model=names[model], rating=float(outcome)),
                    x[pos] if new else None)
        fid += 1

    for pos in range(stream.warmup):
        for col in np.flatnonzero(stream.available[pos]).tolist():
            feed(pos, col, stream.outcomes[pos, col])
    n = len(stream.rows)
    chosen = np.zeros(n, dtype=np.int64)
    explored = np.zeros(n, dtype=bool)
    for pos in range(stream.warmup, n):
        candidates = {names[m]: float(expected_cost[pos, m]) for m in np.flatnonzero(stream.available[pos])}
        live = set(candidates)
        if isinstance(state.ranker, LocalQualityRanker):
            choice = state.ranker.route(x[pos], candidates, None, None, live,
                                        request_id=f"req{pos}" if explore else None)
        else:
            choice = state.ranker.route(x[pos], candidates, None, None, live)
        m = int(names.index(choice.model))
        chosen[pos], explored[pos] = m, choice.exploratory
        if stream.gets_feedback[pos]:
            y = stream.outcomes[pos, m]
            feed(pos, m, 1.0 - y if stream.flipped[pos] else y)
    return chosen, explored


def _refit_choices(name: str, params: dict[str, Any], seed: int, stream: Stream, x: np.ndarray,
                   expected_cost: np.ndarray, refit_every: int) -> np.ndarray:
    n, k = stream.outcomes.shape
    observed = np.zeros((n, k), dtype=bool)
    reported = stream.outcomes.copy()
    observed[: stream.warmup] = stream.available[: stream.warmup]
    chosen = np.zeros(n, dtype=np.int64)
    router = next(r for p, r in grid(name, seed) if p == params)
    for start in range(stream.warmup, n, refit_every):
        seen = observed[:start].any(axis=1)
        router.fit(x[:start][seen], reported[:start][seen], observed[:start][seen])
        end = min(start + refit_every, n)
        predicted = router.predict(x[start:end])
        for pos in range(start, end):
            m = _pick(predicted[pos - start], expected_cost[pos], stream.available[pos])
            chosen[pos] = m
            if stream.gets_feedback[pos]:
                observed[pos, m] = True
                if stream.flipped[pos]:
                    reported[pos, m] = 1.0 - reported[pos, m]
    return chosen


def run_scenario(data: RoutingData, x_all: np.ndarray, scenario: str, seed: int, stream_len: int, warmup: int,
                 refit_every: int, configs: dict[str, dict[str, Any]],
                 routers: tuple[str, ...] = ("local_quality", "eagle", *LEARNED)) -> dict[str, dict[str, Any]]:
    stream = make_stream(data, scenario, seed, stream_len, warmup)
    x = x_all[stream.rows]
    expected_cost = data.expected_cost(stream.rows[: stream.warmup])[stream.rows]
    eagle = BENCH_EAGLE if data.k == 2 else dataclasses.replace(BENCH_EAGLE, local_order="stream")
    choices: dict[str, np.ndarray] = {}
    explored: dict[str, np.ndarray] = {}
    if "local_quality" in routers:
        choices["local_quality"], explored["local_quality"] = _state_choices(LIVE_LOCAL_QUALITY, stream, data, x,
                                                                             expected_cost, explore=True)
        choices["local_quality_greedy"], _ = _state_choices(LIVE_LOCAL_QUALITY, stream, data, x, expected_cost,
                                                            explore=False)
        recency = dataclasses.replace(LIVE_LOCAL_QUALITY, horizon=RECENCY_HORIZON)
        choices["local_quality_recency"], explored["local_quality_recency"] = _state_choices(
            recency, stream, data, x, expected_cost, explore=True)
    if "eagle" in routers:
        choices["eagle"], _ = _state_choices(eagle, stream, data, x, expected_cost, explore=False)
    for name in (r for r in LEARNED if r in routers):
        choices[name] = _refit_choices(name, configs.get(name, grid(name, seed)[1][0]), seed, stream, x,
                                       expected_cost, refit_every)
    n = len(stream.rows)
    rng = np.random.default_rng([seed, 23])
    warm_best = int(np.argmax(np.where(stream.available[: stream.warmup], stream.outcomes[: stream.warmup],
                                       0.0).mean(axis=0)))
    choices["best_single_at_warmup"] = np.full(n, warm_best)
    choices["random"] = np.asarray([rng.choice(np.flatnonzero(stream.available[p])) for p in range(n)])
    best = np.where(stream.available, stream.outcomes, -np.inf).max(axis=1)
    positions = np.arange(n)
    online = positions >= stream.warmup
    after = positions >= stream.event_at
    edges = np.linspace(stream.warmup, n, 11).astype(int)
    out: dict[str, dict[str, Any]] = {}
    for name, chosen in choices.items():
        regret = best - stream.outcomes[positions, chosen]
        row: dict[str, Any] = {
            "regret_after": float(regret[after].mean()),
            "regret_before": float(regret[online & ~after].mean()),
            "regret_curve": [float(regret[a:b].mean()) for a, b in itertools.pairwise(edges)],
        }
        if scenario == "new_model":
            row["share_to_new_model_after"] = float((chosen[after] == stream.focus).mean())
        if name in explored:
            row["explore_share"] = float(explored[name][online].mean())
        out[name] = row
    return out


def run_scenarios(data: RoutingData, x: np.ndarray, seeds: int, seed: int, stream_len: int, warmup: int,
                  refit_every: int, configs: dict[str, dict[str, Any]],
                  routers: tuple[str, ...] = ("local_quality", "eagle", *LEARNED)) -> dict[str, Any]:
    """Every scenario over ``seeds`` seeds: per router the mean and [min, max] of regret_after."""
    out: dict[str, Any] = {}
    for scenario in SCENARIOS:
        runs = []
        for s in range(seeds):
            runs.append(run_scenario(data, x, scenario, seed + s, stream_len, warmup, refit_every, configs, routers))
            after = {name: round(row["regret_after"], 4) for name, row in runs[-1].items()}
            print(f"routing bench: scenario {scenario} seed {s + 1}/{seeds}: regret_after {after}", file=sys.stderr,
                  flush=True)
        merged: dict[str, Any] = {}
        for name in runs[0]:
            values = [r[name]["regret_after"] for r in runs]
            entry: dict[str, Any] = {"regret_after": float(np.mean(values)),
                                     "regret_after_range": [float(min(values)), float(max(values))],
                                     "regret_before": float(np.mean([r[name]["regret_before"] for r in runs])),
                                     "regret_curve": np.mean([r[name]["regret_curve"] for r in runs], axis=0).tolist()}
            for extra in ("share_to_new_model_after", "explore_share"):
                if extra in runs[0][name]:
                    entry[extra] = float(np.mean([r[name][extra] for r in runs]))
            merged[name] = entry
        out[scenario] = merged
    stream = make_stream(data, SCENARIOS[0], seed, stream_len, warmup)
    out["setup"] = {"data_set": data.name, "stream_len": len(stream.rows), "warmup": stream.warmup,
                    "event_at": stream.event_at, "refit_every": refit_every, "seeds": seeds,
                    "degraded_accuracy": DEGRADED_ACCURACY, "sparse_share": SPARSE_SHARE,
                    "adversarial_share": ADVERSARIAL_SHARE}
    return out
