"""The fused and unfused PPO iteration on 2 real worker processes (tiny models, small batch)."""

from __future__ import annotations

from core.rlhf.anneal import AnnealConfig
from workers.trainer.fusion import FusionCluster, FusionWorkload, partition_minibatches, sample_lengths
from workers.trainer.fusion_plan import StageTimes, build_problem, plan_schedules

TINY = {
    "vocab_size": 128,
    "hidden_size": 32,
    "num_layers": 2,
    "num_heads": 2,
    "num_kv_heads": 1,
    "intermediate_size": 64,
}


def test_both_variants_train_every_sample_and_keep_workers_in_sync() -> None:
    workload = FusionWorkload(
        batch_size=8,
        prompt_len=4,
        min_len=2,
        max_len=24,
        length_mu=1.8,
        n_minibatches=1,
        n_microbatches=2,
        inference_microbatch=2,
        rt=0.5,
        model=TINY,
    )
    lengths = sample_lengths(workload)
    groups = partition_minibatches(workload, lengths)
    assert sorted(i for mb in groups for g in mb for i in g) == list(range(8))
    problem = build_problem(workload, StageTimes((1e-3, 1e-3), (2e-3, 2e-3), (1e-3, 5e-4), (2e-3, 1e-3)))
    plans = plan_schedules(problem, AnnealConfig(iterations=300, memory_iterations=50, restarts=1))
    assert plans["sim_fused"] <= plans["sim_unfused"]
    with FusionCluster(workload, pin=False, start_method="fork") as cluster:
        initial = cluster.digests()
        assert initial[0] == initial[1]
        reports = {}
        for fused in (False, True):
            reports[fused] = cluster.run_iteration(fused, plans["fused" if fused else "unfused"], lengths)
            after = cluster.digests()
            assert after[0] == after[1] != initial[0]  # trained, and re-synced
    for report in reports.values():
        assert report.wall_s > 0 and 0.0 <= report.idle_fraction < 1.0
        assert report.gen_inference_s + report.train_s <= report.wall_s + 1e-6
    assert reports[False].migration_at_s is None
