"""Inter-stage fusion policy: migration at Rt, streaming inference, and its offline simulator."""

from __future__ import annotations

import random

import pytest

from core.rlhf.interstage import (
    InferenceTask,
    InterStageConfig,
    InterStageScheduler,
    Migration,
    StageCosts,
    choose_rt,
    round_robin,
    simulate_generation_and_inference,
)

COSTS = StageCosts(
    decode_step=lambda batch: 1.0 + 0.05 * batch,  # memory-bound: batch 1 ~ batch 8
    inference=lambda n, tokens: 0.5 + 0.02 * tokens,
    migrate_per_sample=0.1,
)


def long_tail(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [max(2, min(64, int(rng.lognormvariate(2.3, 0.8)))) for _ in range(n)]


def test_unfused_scores_only_after_the_last_sample() -> None:
    sched = InterStageScheduler(round_robin(4, 2), 2, InterStageConfig(fused=False, inference_microbatch=2))
    sched.update(finished=[0, 1, 2])
    assert sched.schedule().empty  # sample 3 still generating: barrier
    sched.update(finished=[3])
    plan = sched.schedule()
    assert plan.migrations == ()
    assert plan.inference == (InferenceTask(0, (0, 1)), InferenceTask(1, (2, 3)))


def test_fused_migrates_the_tail_once_and_frees_an_instance() -> None:
    cfg = InterStageConfig(rt=0.2, fused=True, inference_microbatch=3)
    sched = InterStageScheduler(round_robin(10, 2), 2, cfg)  # even samples on 0, odd on 1
    sched.update(finished=[0, 1, 2, 3, 4, 5, 6])  # 3 unfinished (7, 8, 9) > 2: no migration yet
    assert sched.schedule() == sched.schedule().__class__()
    sched.update(finished=[7])  # unfinished 8 (on 0) and 9 (on 1): 2 <= 0.2 * 10
    plan = sched.schedule()
    # Tie on live samples: instance 0 survives (lower id), instance 1 moves sample 9 to it.
    assert plan.migrations == (Migration((9,), 1, 0),)
    assert plan.inference == (InferenceTask(1, (0, 1, 2)),)
    assert sched.live == [{8, 9}, set()]
    sched.update(finished=[8])
    assert sched.schedule().migrations == ()  # migration happens once


def test_survivor_is_the_instance_with_most_live_samples() -> None:
    cfg = InterStageConfig(rt=0.5, inference_microbatch=8)
    sched = InterStageScheduler({0: 0, 1: 1, 2: 1, 3: 2}, 3, cfg)
    plan = sched.schedule()  # 4 unfinished > 2
    assert plan.empty
    sched.update(finished=[0, 3])
    plan = sched.schedule()
    assert plan.migrations == ()  # only instance 1 is still generating: nothing to move
    assert {t.instance for t in plan.inference} == {0}


def test_capacity_keeps_enough_survivors() -> None:
    cfg = InterStageConfig(rt=1.0, max_batch_per_instance=2)
    sched = InterStageScheduler(round_robin(6, 3), 3, cfg)
    plan = sched.schedule()  # 6 unfinished need 3 survivors of capacity 2: nothing moves
    assert plan.migrations == ()


def test_finishing_a_sample_that_is_not_generating_is_an_error() -> None:
    sched = InterStageScheduler(round_robin(2, 1), 1, InterStageConfig())
    sched.update(finished=[0])
    with pytest.raises(ValueError, match="not generating"):
        sched.update(finished=[0])
    with pytest.raises(ValueError, match="reported"):
        sched.update(scored=[(0, (1,))])


@pytest.mark.parametrize("seed", range(5))
def test_simulated_fusion_is_faster_on_long_tails(seed: int) -> None:
    lengths = long_tail(32, seed)
    assignment = round_robin(32, 2)
    fused = simulate_generation_and_inference(
        lengths, assignment, 2, InterStageConfig(rt=0.2), COSTS, prompt_tokens=8
    )
    plain = simulate_generation_and_inference(
        lengths, assignment, 2, InterStageConfig(fused=False), COSTS, prompt_tokens=8
    )
    assert fused.makespan < plain.makespan
    # Merging the tail also removes decode steps: less total busy time for the same samples.
    assert sum(fused.busy) < sum(plain.busy)
    assert fused.migration_time is not None and plain.migration_time is None


def test_rt_zero_never_migrates_and_full_rt_migrates_at_once() -> None:
    lengths = long_tail(16, 0)
    never = simulate_generation_and_inference(lengths, round_robin(16, 2), 2, InterStageConfig(rt=0.0), COSTS)
    assert never.migration_time is None
    at_once = simulate_generation_and_inference(
        lengths, round_robin(16, 2), 2, InterStageConfig(rt=1.0), COSTS
    )
    assert at_once.migration_time == 0.0


def test_choose_rt_returns_the_simulated_minimum() -> None:
    samples = [long_tail(32, s) for s in range(3)]
    best, means = choose_rt(samples, 2, COSTS, candidates=(0.0, 0.1, 0.2, 0.4, 1.0), prompt_tokens=8)
    assert means[best] == min(means.values())
    assert set(means) == {0.0, 0.1, 0.2, 0.4, 1.0}


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="rt"):
        InterStageConfig(rt=1.5)
    with pytest.raises(ValueError, match="outside"):
        InterStageScheduler({0: 3}, 2, InterStageConfig())
