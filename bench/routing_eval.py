"""Offline evaluation: every router tuned the same way, over several seeded splits, with 95 % CIs.

Protocol per data set (docs/bench/routing.md):

1. ``splits`` seeded 70/30 splits by distinct prompt (rows sharing a prompt stay together).
2. Inside each training split, 3-fold cross-validation (folds by prompt, seeded) scores each of
   the router's three configurations (``routing_baselines.grid``) by its *tuning score*: the mean,
   over budgets of 0.25, 0.5, 0.75 and 1.0x the fold's best single model's cost, of the best
   quality an operating point reaches within the budget. The best configuration (ties: first) is
   refitted on the whole training split and scored once on the test split. Inner folds use at most
   ``inner_rows`` training rows (seeded sample) to bound run time; the same for every router.
3. Metrics (``routing_metrics.fleet_metrics``) per split, then mean and a 95 % t-interval over
   splits. With two models, RouteLLM's APGR / CPT and Eagle's AUC / AIQ are added (cheaper model
   first), as in issue 8's JSON.
4. ``fit_s``: the final fit on the training split; ``update_s``: absorbing 100 more feedback
   events (incremental for local quality and Eagle, a full refit for the others), first split only.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import sys
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from bench.routing_baselines import ROUTERS, grid
from bench.routing_data import RoutingData
from bench.routing_metrics import (
    aiq,
    best_single,
    fleet_metrics,
    lambda_grid,
    operating_points,
    quality_at_cost,
    reference_rows,
    summarise,
)

FLEET_METRICS = ("quality_at_best_single_cost", "cost_to_match_best_single", "oracle_gap_closed",
                 "topic_oracle_gain_reached", "rare_recall")
TWO_MODEL_METRICS = ("auc", "aiq", "apgr", "cpt50", "cpt80")
UPDATE_BATCH = 100
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


@contextlib.contextmanager
def quiet_gc() -> Iterator[None]:
    """Collect, then keep the cyclic GC off inside a timed block (as ``timeit`` does)."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def ci95(values: list[float]) -> list[float] | None:
    """Mean +- t(0.975, n-1) * sd / sqrt(n) over splits; ``None`` with fewer than two values."""
    if len(values) < 2:
        return None
    arr = np.asarray(values, dtype=np.float64)
    half = T_975.get(len(arr) - 1, 1.96) * arr.std(ddof=1) / math.sqrt(len(arr))
    return [float(arr.mean() - half), float(arr.mean() + half)]


def prompt_split(ids: np.ndarray, rows: np.ndarray, share: float, rng: np.random.Generator
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Split ``rows`` so that rows sharing a prompt id fall on the same side."""
    unique = np.unique(ids[rows])
    first = set(rng.permutation(unique)[: round(share * len(unique))].tolist())
    in_first = np.asarray([i in first for i in ids[rows].tolist()], dtype=bool)
    return rows[in_first], rows[~in_first]


def prompt_folds(ids: np.ndarray, rows: np.ndarray, folds: int, rng: np.random.Generator) -> list[np.ndarray]:
    unique = rng.permutation(np.unique(ids[rows]))
    fold_of = {int(p): j % folds for j, p in enumerate(unique.tolist())}
    assigned = np.asarray([fold_of[int(p)] for p in ids[rows].tolist()])
    return [rows[assigned == j] for j in range(folds)]


def tuning_score(predicted: np.ndarray, expected_cost: np.ndarray, correct: np.ndarray, cost: np.ndarray) -> float:
    _, _, c_best = best_single(correct, cost)
    quality, spend, _ = operating_points(predicted, expected_cost, correct, cost, lambda_grid(expected_cost))
    scores = [quality_at_cost(quality, spend, share * c_best)[0] for share in (0.25, 0.5, 0.75, 1.0)]
    return float(np.nanmean(scores))


def tune(name: str, data: RoutingData, x: np.ndarray, train: np.ndarray, seed: int, inner_rows: int
         ) -> tuple[dict[str, Any], list[float]]:
    """(chosen configuration, inner CV score per configuration) for router ``name``."""
    rng = np.random.default_rng([seed, 11])
    rows = train if len(train) <= inner_rows else np.sort(rng.choice(train, size=inner_rows, replace=False))
    folds = prompt_folds(data.prompt_ids(), rows, 3, rng)
    full = np.ones_like(data.correct, dtype=bool)
    cost = data.cost()
    scores = []
    options = grid(name, seed)
    for _, router in options:
        fold_scores = []
        for j, held in enumerate(folds):
            fit_rows = np.concatenate([f for i, f in enumerate(folds) if i != j])
            router.fit(x[fit_rows], data.correct[fit_rows], full[fit_rows])
            expected = data.expected_cost(fit_rows)[held]
            fold_scores.append(tuning_score(router.predict(x[held]), expected, data.correct[held], cost[held]))
        scores.append(float(np.mean(fold_scores)))
    best = int(np.argmax(scores))
    return options[best][0], scores


def evaluate_split(data: RoutingData, x: np.ndarray, split_seed: int, routers: tuple[str, ...], inner_rows: int,
                   time_updates: bool) -> dict[str, Any]:
    rng = np.random.default_rng([split_seed, 7])
    train, test = prompt_split(data.prompt_ids(), np.arange(len(data)), 0.7, rng)
    cost = data.cost()
    expected = data.expected_cost(train)[test]
    correct = data.correct[test]
    groups = data.groups[test]
    lam = lambda_grid(expected)
    full = np.ones_like(data.correct, dtype=bool)
    out: dict[str, Any] = {"references": reference_rows(correct, cost[test], expected, groups, data.models, lam),
                           "routers": {}, "n_train": len(train), "n_test": len(test)}
    order = np.argsort(data.prices[:, 1], kind="stable") if data.k == 2 else None
    for name in routers:
        chosen, inner = tune(name, data, x, train, split_seed, inner_rows)
        router = next(r for params, r in grid(name, split_seed) if params == chosen)
        with quiet_gc():
            start = time.perf_counter()
            router.fit(x[train], data.correct[train], full[train])
            fit_s = time.perf_counter() - start
        predicted = router.predict(x[test])
        row: dict[str, Any] = dict(fleet_metrics(predicted, expected, correct, cost[test], groups, lam))
        if order is not None:
            pair = predicted[:, order]
            row.update(summarise(pair, expected[:, order], correct[:, order], split_seed))
            row["aiq"] = aiq(pair, expected[:, order], correct[:, order], cost[test][:, order])
        row.update(fit_s=fit_s, config=chosen, inner_scores=inner)
        if time_updates:
            row["update_s"] = _update_seconds(router, data, x, train, test, full)
        out["routers"][name] = row
    return out


def _update_seconds(router: Any, data: RoutingData, x: np.ndarray, train: np.ndarray, test: np.ndarray,
                    full: np.ndarray) -> float:
    batch = test[:UPDATE_BATCH]
    with quiet_gc():
        start = time.perf_counter()
        if hasattr(router, "update"):
            router.update(x[batch], data.correct[batch], full[batch])
        else:
            grown = np.concatenate([train, batch])
            router.fit(x[grown], data.correct[grown], full[grown])
        return time.perf_counter() - start


def aggregate(per_split: list[dict[str, Any]], routers: tuple[str, ...], two_models: bool) -> dict[str, Any]:
    """Mean and 95 % CI over splits of every metric; references averaged the same way."""
    metrics = FLEET_METRICS + (TWO_MODEL_METRICS if two_models else ())
    out: dict[str, Any] = {}
    for name in routers:
        rows = [s["routers"][name] for s in per_split]
        entry: dict[str, Any] = {"ci95": {}}
        for metric in metrics:
            values = [r[metric] for r in rows if r.get(metric) is not None]
            entry[metric] = float(np.mean(values)) if values else None
            entry["ci95"][metric] = ci95(values)
            missing = len(rows) - len(values)
            if missing:
                entry[f"{metric}_undefined_splits"] = missing
        entry["fit_s"] = float(np.median([r["fit_s"] for r in rows]))
        entry["update_s"] = next((r["update_s"] for r in rows if "update_s" in r), None)
        entry["configs"] = [r["config"] for r in rows]
        out[name] = entry
    return out


def _mean_reference(per_split: list[dict[str, Any]]) -> dict[str, Any]:
    refs = [s["references"] for s in per_split]
    best_models = [r["best_single"]["model"] for r in refs]
    out: dict[str, Any] = {"best_single": {
        "model": max(set(best_models), key=best_models.count),
        "quality": float(np.mean([r["best_single"]["quality"] for r in refs])),
        "cost": float(np.mean([r["best_single"]["cost"] for r in refs])),
        "models_per_split": best_models}}
    return out


def _price_rank(data: RoutingData, model: str) -> float:
    """0 for the cheapest model by output price, 1 for the priciest."""
    order = list(np.argsort(data.prices[:, 1], kind="stable"))
    return order.index(data.models.index(model)) / max(1, data.k - 1)


def _mean_oracles(per_split: list[dict[str, Any]], out: dict[str, Any]) -> dict[str, Any]:
    refs = [s["references"] for s in per_split]
    for name in ("oracle", "topic_oracle"):
        out[name] = {key: float(np.mean([r[name][key] for r in refs]))
                     for key in ("quality", "cost", "quality_at_best_single_cost")}
    return out


def evaluate(data: RoutingData, x: np.ndarray, splits: int, seed: int, routers: tuple[str, ...] = ROUTERS,
             inner_rows: int = 4000) -> dict[str, Any]:
    """The issue-15 block of one data set."""
    per_split = []
    for s in range(splits):
        per_split.append(evaluate_split(data, x, seed + s, routers, inner_rows, time_updates=s == 0))
        progress = {name: {k: v for k, v in row.items() if k in (*FLEET_METRICS, "config")}
                    for name, row in per_split[-1]["routers"].items()}
        print(f"routing bench: {data.name} split {s + 1}/{splits}: {json.dumps(progress)}", file=sys.stderr,
              flush=True)
    references = _mean_oracles(per_split, _mean_reference(per_split))
    references["best_single"]["price_rank"] = _price_rank(data, references["best_single"]["model"])
    result: dict[str, Any] = {"models": data.k, "rows": len(data), "topics": len(data.group_names), "splits": splits,
                              **references,
                              "routers": aggregate(per_split, routers, data.k == 2),
                              "n_train": per_split[0]["n_train"], "n_test": per_split[0]["n_test"]}
    if data.k == 2:
        cheap, pricey = np.argsort(data.prices[:, 1], kind="stable")
        result["weak_accuracy"] = float(data.correct[:, cheap].mean())
        result["strong_accuracy"] = float(data.correct[:, pricey].mean())
    return result
