"""Fused actor+critic pipeline schedules: simulator, validator, annealer, lower bound."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from core.rlhf.anneal import AnnealConfig, anneal_schedule, format_timeline
from core.rlhf.pipeline import (
    PipelineModel,
    PipelineProblem,
    Schedule,
    Slot,
    Task,
    all_forward_first_schedule,
    lower_bound,
    sequential_schedule,
    simulate,
    validate,
)


def make_model(
    name: str,
    stages: int,
    mb: int,
    f: int,
    nodes: tuple[int, ...] | None = None,
    mem: float = 1.0,
    b: int | None = None,
) -> PipelineModel:
    return PipelineModel(
        name=name,
        n_microbatches=mb,
        forward_time=(f,) * stages,
        backward_time=((2 * f) if b is None else b,) * stages,
        stage_nodes=nodes if nodes is not None else tuple(range(stages)),
        activation_memory=(mem,) * stages,
    )


def actor_critic(
    n: int = 2, mb: int = 4, f_actor: int = 2, f_critic: int = 2, memory_limit: float | None = None
) -> PipelineProblem:
    actor = make_model("actor", n, mb, f_actor)
    critic = make_model("critic", n, mb, f_critic, nodes=tuple(reversed(range(n))))
    return PipelineProblem(models=(actor, critic), n_nodes=n, memory_limit=memory_limit)


def test_one_f_one_b_makespan_and_bubble_match_the_formula() -> None:
    # (M + N - 1) * (f + b) = (4 + 2 - 1) * 3 and bubble (N-1)/(N-1+M) = 1/5.
    problem = PipelineProblem(models=(make_model("a", 2, 4, 1),), n_nodes=2)
    tl = simulate(problem, sequential_schedule(problem))
    assert tl is not None
    assert tl.makespan == 15
    assert tl.idle_fraction(2) == pytest.approx(0.2)
    assert validate(problem, sequential_schedule(problem)) == []


def test_one_f_one_b_holds_at_most_stage_count_microbatches() -> None:
    problem = PipelineProblem(models=(make_model("a", 4, 8, 1),), n_nodes=4)
    tl = simulate(problem, sequential_schedule(problem, "1f1b"))
    gp = simulate(problem, sequential_schedule(problem, "gpipe"))
    assert tl is not None and gp is not None
    assert tl.peak_memory == (4.0, 3.0, 2.0, 1.0)
    assert gp.peak_memory == (8.0,) * 4


def test_deadlocking_order_is_detected() -> None:
    problem = PipelineProblem(models=(make_model("a", 2, 1, 1),), n_nodes=2)
    # Node 1 (the last stage) lists B before F: it can never start.
    bad = Schedule(((Slot(0, True), Slot(0, False)), (Slot(0, False), Slot(0, True))))
    assert simulate(problem, bad) is None
    assert any("deadlock" in p for p in validate(problem, bad))


def test_wrong_slot_counts_are_reported() -> None:
    problem = PipelineProblem(models=(make_model("a", 2, 2, 1),), n_nodes=2)
    good = sequential_schedule(problem)
    short = Schedule((good.orders[0][:-1], good.orders[1]))
    assert any("backward slots" in p for p in validate(problem, short))


def test_validator_catches_a_tampered_timeline() -> None:
    problem = actor_critic()
    sched = sequential_schedule(problem)
    tl = simulate(problem, sched)
    assert tl is not None
    # Move the first stage-1 forward of the actor before its stage-0 input is ready.
    tasks = list(tl.tasks)
    idx = next(i for i, t in enumerate(tasks) if t.model == 0 and t.stage == 1 and t.forward)
    moved = tasks[idx]
    duration = moved.finish - moved.start
    tasks[idx] = Task(moved.model, moved.microbatch, moved.stage, True, moved.node, 0, duration)
    problems = validate(problem, sched, replace(tl, tasks=tuple(tasks)))
    assert any("before its input" in p for p in problems)


def test_memory_limit_violation_is_reported() -> None:
    problem = PipelineProblem(models=(make_model("a", 2, 4, 1),), n_nodes=2, memory_limit=1.5)
    gpipe = sequential_schedule(problem, "gpipe")
    assert any("peak activation memory" in p for p in validate(problem, gpipe))


def test_anneal_beats_sequential_one_f_one_b_and_respects_everything() -> None:
    problem = actor_critic(n=2, mb=4, memory_limit=4.0)
    result = anneal_schedule(problem, AnnealConfig(iterations=3000, memory_iterations=500, restarts=1))
    seq = simulate(problem, sequential_schedule(problem))
    assert seq is not None
    assert validate(problem, result.schedule) == []
    assert result.timeline.makespan < seq.makespan  # opposite-direction pipelines fill each other's bubbles
    assert lower_bound(problem) <= result.timeline.makespan
    assert max(result.timeline.peak_memory) <= 4.0
    assert format_timeline(problem, result.timeline).count("node") == 2


def test_anneal_is_deterministic_for_a_seed() -> None:
    problem = actor_critic(n=2, mb=3, f_actor=3, f_critic=1)
    cfg = AnnealConfig(iterations=800, memory_iterations=100, restarts=1, seed=7)
    assert anneal_schedule(problem, cfg).schedule == anneal_schedule(problem, cfg).schedule


def test_anneal_rejects_a_limit_below_one_f_one_b() -> None:
    with pytest.raises(ValueError, match="memory limit"):
        anneal_schedule(actor_critic(memory_limit=0.5), AnnealConfig(iterations=10))


@pytest.mark.parametrize("seed", range(6))
def test_lower_bound_never_exceeds_any_valid_schedule(seed: int) -> None:
    rng = random.Random(seed)
    n = rng.choice([2, 3, 4])
    actor = PipelineModel(
        "actor",
        rng.randint(1, 5),
        tuple(rng.randint(1, 4) for _ in range(n)),
        tuple(rng.randint(1, 8) for _ in range(n)),
        tuple(range(n)),
        (1.0,) * n,
    )
    critic = PipelineModel(
        "critic",
        rng.randint(1, 5),
        tuple(rng.randint(1, 4) for _ in range(n)),
        tuple(rng.randint(1, 8) for _ in range(n)),
        tuple(reversed(range(n))),
        (1.0,) * n,
    )
    problem = PipelineProblem((actor, critic), n)
    bound = lower_bound(problem)
    for sched in (
        sequential_schedule(problem),
        sequential_schedule(problem, "gpipe"),
        all_forward_first_schedule(problem),
    ):
        tl = simulate(problem, sched)
        assert tl is not None and validate(problem, sched) == []
        assert bound <= tl.makespan
    cfg = AnnealConfig(iterations=400, memory_iterations=0, restarts=1, seed=seed)
    result = anneal_schedule(problem, cfg)
    assert bound <= result.timeline.makespan <= result.initial.makespan


def test_problem_validation_names_bad_values() -> None:
    with pytest.raises(ValueError, match="distinct"):
        make_model("a", 2, 1, 1, nodes=(0, 0))
    with pytest.raises(ValueError, match="outside"):
        PipelineProblem((make_model("a", 2, 1, 1, nodes=(0, 5)),), n_nodes=2)


def test_balanced_microbatches_minimise_the_costliest_group() -> None:
    import itertools

    from core.rlhf.pipeline import balance_microbatches

    lengths = [100, 10, 12, 50, 11, 9, 48, 13]
    groups = balance_microbatches(lengths, 3)
    assert sorted(i for g in groups for i in g) == list(range(8))
    worst = max(len(g) * max(lengths[i] for i in g) for g in groups)
    # Brute force over contiguous cuts of the length-sorted order.
    order = sorted(range(8), key=lambda i: -lengths[i])
    best = min(
        max((b - a) * lengths[order[a]] for a, b in itertools.pairwise((0, x, y, 8)))
        for x in range(1, 7)
        for y in range(x + 1, 8)
    )
    assert worst == best == 100
    assert groups[0] == [0]
