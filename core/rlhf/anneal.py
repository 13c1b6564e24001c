"""Simulated-annealing search for fused pipeline schedules (RLHFuse intra-stage fusion).

Follows FlexFusion's ``DualEgoSolver``: the state is the per-node ordered task lists of
``core.rlhf.pipeline``; a move swaps two slots on one random node; infeasible states (deadlock,
or over the memory limit) are rejected; Metropolis acceptance on the makespan with a
geometrically cooled temperature; the tie-breaker is the sum of finish times (work done earlier
unblocks other nodes sooner). A second pass then anneals the *peak activation memory* while
never accepting a makespan above the first pass's best.

Differences from FlexFusion, on purpose: the search starts from the sequential 1F1B schedule
(feasible under any memory limit 1F1B meets, and it makes "never worse than the unfused
baseline" hold by construction); the temperature schedule is set by an iteration budget and
scaled to the problem's task times instead of fixed constants; restarts run one after another
(no MPI).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from core.rlhf.pipeline import (
    PipelineProblem,
    Schedule,
    Slot,
    Timeline,
    sequential_schedule,
    simulate,
)


@dataclass(frozen=True)
class AnnealConfig:
    """Budget and temperature of the search."""

    iterations: int = 20_000
    """Moves per restart in the makespan pass."""
    memory_iterations: int = 5_000
    """Moves per restart in the memory pass (0 skips it)."""
    restarts: int = 2
    """Independent seeds; the best result is kept."""
    seed: int = 0
    initial_temperature: float | None = None
    """Start temperature in time units (default: the mean task time)."""
    final_temperature: float | None = None
    """End temperature (default: 1% of the smallest non-zero task time)."""

    def __post_init__(self) -> None:
        if self.iterations < 0 or self.memory_iterations < 0:
            raise ValueError(f"iterations must be >= 0, got {self.iterations} and {self.memory_iterations}")
        if self.restarts < 1:
            raise ValueError(f"restarts must be >= 1, got {self.restarts}")


@dataclass(frozen=True)
class AnnealResult:
    schedule: Schedule
    timeline: Timeline
    initial: Timeline
    """Timeline of the starting (sequential 1F1B) schedule."""
    accepted_moves: int


def _feasible(problem: PipelineProblem, schedule: Schedule) -> Timeline | None:
    timeline = simulate(problem, schedule)
    if timeline is None:
        return None
    if problem.memory_limit is not None and max(timeline.peak_memory) > problem.memory_limit + 1e-9:
        return None
    return timeline


def _temperatures(problem: PipelineProblem, cfg: AnnealConfig) -> tuple[float, float]:
    times = [t for model in problem.models for t in (*model.forward_time, *model.backward_time)]
    positive = [t for t in times if t > 0] or [1]
    start = cfg.initial_temperature if cfg.initial_temperature is not None else sum(positive) / len(positive)
    end = cfg.final_temperature if cfg.final_temperature is not None else 0.01 * min(positive)
    if not 0 < end <= start:
        raise ValueError(f"temperatures must satisfy 0 < final <= initial, got {end} and {start}")
    return start, end


def _swap(schedule: Schedule, rng: random.Random) -> Schedule | None:
    node = rng.randrange(len(schedule.orders))
    order = schedule.orders[node]
    if len(order) < 2:
        return None
    i, j = rng.randrange(len(order)), rng.randrange(len(order))
    if order[i] == order[j]:
        return None  # identical slots: the same schedule
    swapped = list(order)
    swapped[i], swapped[j] = swapped[j], swapped[i]
    orders = list(schedule.orders)
    orders[node] = tuple(swapped)
    return Schedule(tuple(orders))


def _anneal_pass(
    problem: PipelineProblem,
    start: Schedule,
    start_timeline: Timeline,
    *,
    iterations: int,
    rng: random.Random,
    temps: tuple[float, float],
    key: str,
    makespan_cap: int | None,
) -> tuple[Schedule, Timeline, int]:
    """One annealing pass minimising ``key`` ("time" or "memory"), lexicographically tie-broken."""

    def score(tl: Timeline) -> tuple[float, ...]:
        if key == "time":
            return (tl.makespan, tl.sum_finish)
        return (max(tl.peak_memory), sum(tl.peak_memory), tl.makespan, tl.sum_finish)

    t0, t1 = temps
    cooling = (t1 / t0) ** (1.0 / max(iterations, 1))
    temperature = t0
    current, current_tl = start, start_timeline
    best, best_tl = start, start_timeline
    accepted = 0
    for _ in range(iterations):
        temperature *= cooling
        candidate = _swap(current, rng)
        if candidate is None:
            continue
        tl = _feasible(problem, candidate)
        if tl is None or (makespan_cap is not None and tl.makespan > makespan_cap):
            continue
        new, cur = score(tl), score(current_tl)
        # Metropolis on the primary objective; equal primaries are sideways moves.
        accept = new < cur or rng.random() < math.exp(-(new[0] - cur[0]) / temperature)
        if accept:
            accepted += 1
            current, current_tl = candidate, tl
            if score(tl) < score(best_tl):
                best, best_tl = candidate, tl
    return best, best_tl, accepted


def anneal_schedule(problem: PipelineProblem, cfg: AnnealConfig | None = None) -> AnnealResult:
    """Search a fused schedule; never worse (makespan) than sequential 1F1B, which it starts from.

    Raises ``ValueError`` if the sequential 1F1B start already breaks the memory limit (then no
    limit-respecting schedule is known to exist for the search to move through).
    """
    cfg = cfg or AnnealConfig()
    initial = sequential_schedule(problem, "1f1b")
    initial_tl = _feasible(problem, initial)
    if initial_tl is None:
        raise ValueError(f"sequential 1F1B exceeds the memory limit {problem.memory_limit}; raise the limit")
    temps = _temperatures(problem, cfg)
    best, best_tl, accepted = initial, initial_tl, 0
    for restart in range(cfg.restarts):
        rng = random.Random(cfg.seed * 1_000_003 + restart)
        sched, tl, acc = _anneal_pass(
            problem,
            initial,
            initial_tl,
            iterations=cfg.iterations,
            rng=rng,
            temps=temps,
            key="time",
            makespan_cap=None,
        )
        accepted += acc
        if (tl.makespan, tl.sum_finish) < (best_tl.makespan, best_tl.sum_finish):
            best, best_tl = sched, tl
    if cfg.memory_iterations:
        rng = random.Random(cfg.seed * 1_000_003 + cfg.restarts)
        mem_temps = (max(best_tl.peak_memory) or 1.0, 0.01 * (max(best_tl.peak_memory) or 1.0))
        best, best_tl, acc = _anneal_pass(
            problem,
            best,
            best_tl,
            iterations=cfg.memory_iterations,
            rng=rng,
            temps=mem_temps,
            key="memory",
            makespan_cap=best_tl.makespan,
        )
        accepted += acc
    return AnnealResult(schedule=best, timeline=best_tl, initial=initial_tl, accepted_moves=accepted)


def format_timeline(problem: PipelineProblem, timeline: Timeline, unit: int = 1) -> str:
    """ASCII Gantt chart: one row per node, ``F``/``B`` + micro-batch, lower case for model 1+."""
    width = math.ceil(timeline.makespan / unit)
    rows = []
    for node in range(problem.n_nodes):
        cells = ["."] * width
        for task in timeline.tasks:
            if task.node != node:
                continue
            letter = "F" if task.forward else "B"
            if task.model > 0:
                letter = letter.lower()
            for x in range(task.start // unit, max(task.start // unit + 1, task.finish // unit)):
                if x < width:
                    cells[x] = letter
        rows.append(f"node {node}: " + "".join(cells))
    return "\n".join(rows)


__all__ = ["AnnealConfig", "AnnealResult", "Slot", "anneal_schedule", "format_timeline"]
