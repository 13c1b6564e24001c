"""``flywheel bench routing`` end to end on small folders: 300 real two-model rows and a generated fleet.

The embedder is a deterministic fake (a hash of the text -> a unit vector): the real MiniLM is
tested in test_embedding.py, and this test is about the benchmark's plumbing on small data (issue
15: a 300-row folder crashed the drift warm-up).
"""

import argparse
import hashlib
import json

import numpy as np
import pytest

from bench import routing, routing_generator
from bench.routing_data import DEFAULT_DATA_DIR, load_folder


def fake_embed(texts: list[str]) -> np.ndarray:
    out = np.empty((len(texts), 384), dtype=np.float32)
    for i, text in enumerate(texts):
        seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")
        v = np.random.default_rng(seed).normal(size=384)
        out[i] = v / np.linalg.norm(v)
    return out


def bench_args(data, cache, **extra) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    routing.add_arguments(parser)
    args = parser.parse_args(["--data", str(data), "--cache-dir", str(cache), "--quick"])
    for key, value in extra.items():
        setattr(args, key, value)
    return args


@pytest.fixture(scope="module")
def small_real(tmp_path_factory):
    out = tmp_path_factory.mktemp("real300")
    summary = routing_generator.real_sample(out, DEFAULT_DATA_DIR, 300, seed=0)
    assert {s["rows"] for s in summary.values()} == {300}
    return out


def test_a_300_row_two_model_folder_runs_and_keeps_the_two_model_keys(small_real, tmp_path):
    result = routing.run(bench_args(small_real, tmp_path, routers="local_quality,eagle,knn"), embed=fake_embed)
    json.dumps(result)  # the printed form
    assert result["default_router"] == "local_quality"
    assert set(result["datasets"]) == {"gsm8k", "mmlu"}
    for ds in result["datasets"].values():
        assert ds["models"] == 2 and ds["rows"] == 300
        assert {"model", "quality", "cost"} <= set(ds["best_single"])
        assert ds["oracle"]["quality"] >= ds["best_single"]["quality"]
        assert ds["topic_oracle"]["quality"] <= ds["oracle"]["quality"] + 1e-12
        for row in ds["routers"].values():
            for key in ("quality_at_best_single_cost", "cost_to_match_best_single", "oracle_gap_closed",
                        "topic_oracle_gain_reached", "rare_recall", "ci95", "update_s", "fit_s",
                        "auc", "aiq", "apgr", "cpt50", "cpt80"):
                assert key in row
    for scenario in ("drift", "new_model", "sparse_feedback", "adversarial_feedback"):
        assert {"local_quality", "eagle", "knn"} <= set(result["scenarios"][scenario])
        assert "regret_after" in result["scenarios"][scenario]["local_quality"]
    assert result["scenarios"]["setup"]["warmup"] <= 300 // 5  # the warm-up fits small data
    assert {"p50", "p99", "history", "models"} <= set(result["decision_latency_ms"])


def test_a_generated_many_model_folder_runs_every_router(tmp_path):
    folder = tmp_path / "fleet"
    summary = routing_generator.generate_folder(folder, DEFAULT_DATA_DIR, rows=400, models=4, seed=0,
                                                cache_dir=tmp_path / "cache", profiles=["premium"],
                                                embed=fake_embed)
    assert summary["premium"]["rows"] == 400
    data = load_folder(folder)["premium"]
    assert data.k == 4 and len(data) == 400 and data.prices[:, 1].max() / data.prices[:, 1].min() >= 99.99
    result = routing.run(bench_args(folder, tmp_path / "cache"), embed=fake_embed)
    ds = result["datasets"]["premium"]
    assert set(ds["routers"]) == {"local_quality", "eagle", "knn", "mlp", "svr", "mf"}
    assert "auc" not in ds["routers"]["knn"]  # the two-model metrics only where there are two models
    assert "lowest_regret_after_drift" in result["targets"]
