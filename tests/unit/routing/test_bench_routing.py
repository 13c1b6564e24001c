"""The routing benchmark's per-data-set pipeline on a small synthetic data set (shape and sanity)."""

import gc

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from bench.routing import apgr_difference_ci, run_dataset
from bench.routing_data import RoutingData

from .conftest import clustered_vectors, unit_vectors


def _synthetic(n: int = 240, seed: int = 0) -> tuple[RoutingData, np.ndarray]:
    """Two topics: the strong model wins on topic 1 only, so a similarity router can learn it."""
    rng = np.random.default_rng(seed)
    x = clustered_vectors(n, 384, clusters=2, seed=seed, spread=0.5)
    topic = (x @ unit_vectors(2, 384, seed + 1).T).argmax(axis=1)  # the clusters' centres
    weak = rng.random(n) < 0.6
    strong = np.where(topic == 1, rng.random(n) < 0.95, weak)
    data = RoutingData(name="synthetic", prompts=[f"q{i}" for i in range(n)], groups=np.zeros(n, dtype=np.int64),
                       group_names=["all"], correct=np.stack([weak, strong], axis=1).astype(float),
                       input_tokens=np.full(n, 100.0), output_tokens=np.full((n, 2), 1.0))
    return data, x


def test_run_dataset_reports_every_router_and_eagle_learns_the_topic():
    torch.set_num_threads(1)
    data, x = _synthetic()
    try:
        with threadpool_limits(limits=1):  # as bench.routing.run does
            result = run_dataset(data, x, seed=0, batches=1)
    finally:
        gc.unfreeze()  # run_dataset's timing blocks freeze survivors; give them back (as run does)
    routers = result["routers"]
    expected = {"eagle", "eagle_global", "eagle_local", "eagle_paper", "knn", "mlp", "svr", "mf",
                "random", "strong", "weak", "oracle"}
    assert set(routers) == expected
    for name in expected - {"strong", "weak"}:
        assert {"auc", "aiq", "apgr", "cpt50", "cpt80", "fit_s", "update_s"} <= set(routers[name])
    assert routers["eagle"]["apgr"] > 0.6 > routers["eagle_global"]["apgr"]
    assert routers["strong"]["auc"] > routers["weak"]["auc"]
    assert set(result["eagle_minus_baseline_apgr_ci95"]) == {"knn", "mlp", "svr", "mf"}


def test_apgr_difference_ci_of_a_router_with_itself_is_zero():
    data, _ = _synthetic(120, seed=1)
    predicted = np.random.default_rng(2).random((120, 2))
    assert apgr_difference_ci(predicted, predicted, data.correct, seed=0, reps=20) == [0.0, 0.0]
