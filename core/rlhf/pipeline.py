"""Fused pipeline schedules for training several models (actor + critic) on the same nodes.

Model (after FlexFusion's ``DualEgoSolver``):

- A ``PipelineModel`` has ``S`` stages, stage ``s`` placed on node ``stage_nodes[s]`` (distinct
  nodes per model), and ``M`` micro-batches. Micro-batch ``k`` runs ``F`` on stages 0..S-1,
  then ``B`` on stages S-1..0; each of those tasks waits for the previous one in that chain.
- A schedule is, for every node, an ordered list of ``Slot(model, forward)``. The i-th forward
  slot of model ``m`` on a node is micro-batch ``i`` of that model's stage there (stages process
  micro-batches in FIFO order, as in 1F1B), so an order is fully described by where each model's
  F and B slots sit. Swapping two slots is the annealing move.
- ``simulate`` replays the lists: every node runs its list strictly in order, and a task starts at
  ``max(node free, dependency finished)``. If no node can start its next task, the order
  deadlocks (``None``). Because start times are forced by the order, the simulated timeline is
  what an executor that blocks on its next task's input produces with the given task times.
- A micro-batch's activations for one stage are held from the start of its ``F`` to the end of
  its ``B``; ``peak_memory`` is the per-node maximum of the sum of held activations (frees at a
  given instant happen before allocations).

Schedules are validated (``validate``) for: exactly the right slots per node, dependency order,
no overlap on a node, deadlock freedom and an activation-memory bound.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple


@dataclass(frozen=True)
class PipelineModel:
    """One model trained with pipeline parallelism."""

    name: str
    n_microbatches: int
    forward_time: tuple[int, ...]
    """Forward time of one micro-batch per stage (integer time units)."""
    backward_time: tuple[int, ...]
    """Backward time of one micro-batch per stage (usually about 2x forward)."""
    stage_nodes: tuple[int, ...]
    """Node of each stage; distinct, so each node holds at most one stage of this model."""
    activation_memory: tuple[float, ...]
    """Activation memory one micro-batch holds on each stage between its F and B."""

    def __post_init__(self) -> None:
        n = len(self.stage_nodes)
        if n == 0:
            raise ValueError(f"model {self.name!r} needs at least one stage")
        if self.n_microbatches < 1:
            raise ValueError(f"model {self.name!r}: n_microbatches must be >= 1, got {self.n_microbatches}")
        lengths = (len(self.forward_time), len(self.backward_time), len(self.activation_memory))
        if any(length != n for length in lengths):
            raise ValueError(f"model {self.name!r}: forward/backward/memory lengths {lengths} != stages {n}")
        if len(set(self.stage_nodes)) != n:
            raise ValueError(f"model {self.name!r}: stage_nodes {self.stage_nodes} must be distinct")
        if min(self.forward_time) < 0 or min(self.backward_time) < 0:
            raise ValueError(f"model {self.name!r}: task times must be >= 0")

    @property
    def n_stages(self) -> int:
        return len(self.stage_nodes)

    def stage_on(self, node: int) -> int | None:
        """The stage this model places on ``node``, or None."""
        try:
            return self.stage_nodes.index(node)
        except ValueError:
            return None


@dataclass(frozen=True)
class PipelineProblem:
    """Models sharing ``n_nodes`` nodes, with an optional per-node activation-memory limit."""

    models: tuple[PipelineModel, ...]
    n_nodes: int
    memory_limit: float | None = None

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError("a pipeline problem needs at least one model")
        for model in self.models:
            bad = [node for node in model.stage_nodes if not 0 <= node < self.n_nodes]
            if bad:
                raise ValueError(f"model {model.name!r} uses nodes {bad} outside 0..{self.n_nodes - 1}")

    def slot_counts(self, node: int) -> dict[int, int]:
        """Micro-batches each model runs on ``node`` (models with no stage there are absent)."""
        return {
            m: model.n_microbatches for m, model in enumerate(self.models) if model.stage_on(node) is not None
        }


class Slot(NamedTuple):
    """One entry of a node's ordered task list: a forward or backward of some model."""

    model: int
    forward: bool


@dataclass(frozen=True)
class Schedule:
    """Per-node ordered task lists."""

    orders: tuple[tuple[Slot, ...], ...]


@dataclass(frozen=True)
class Task:
    """One executed task of a timeline."""

    model: int
    microbatch: int
    stage: int
    forward: bool
    node: int
    start: int
    finish: int


@dataclass(frozen=True)
class Timeline:
    tasks: tuple[Task, ...]
    makespan: int
    sum_finish: int
    """Sum of all finish times: the annealer's tie-breaker (earlier work frees later work)."""
    peak_memory: tuple[float, ...]
    """Peak held activation memory per node."""

    def busy_time(self, node: int) -> int:
        return sum(task.finish - task.start for task in self.tasks if task.node == node)

    def idle_fraction(self, n_nodes: int) -> float:
        """Idle node-time over total node-time up to the makespan (the bubble fraction)."""
        if self.makespan == 0:
            return 0.0
        busy = sum(task.finish - task.start for task in self.tasks)
        return 1.0 - busy / (n_nodes * self.makespan)


def _task_time(model: PipelineModel, stage: int, forward: bool) -> int:
    return model.forward_time[stage] if forward else model.backward_time[stage]


def simulate(problem: PipelineProblem, schedule: Schedule) -> Timeline | None:
    """Replay ``schedule``; None if it deadlocks or a node's list has the wrong slots."""
    n_nodes = problem.n_nodes
    if len(schedule.orders) != n_nodes:
        return None
    models = problem.models
    # node_stage[node][m]: the stage model m has on node (or -1).
    node_stage = [
        [(-1 if (s := model.stage_on(node)) is None else s) for model in models] for node in range(n_nodes)
    ]
    # chain_end[m][k][j]: finish of the j-th task of micro-batch k (j < S: F on stage j; j >= S: B on
    # stage 2S-1-j); -1 if not run yet.
    chain_end = [[[-1] * (2 * model.n_stages) for _ in range(model.n_microbatches)] for model in models]
    node_free = [0] * n_nodes
    next_index = [0] * n_nodes
    done_f = [[0] * len(models) for _ in range(n_nodes)]
    done_b = [[0] * len(models) for _ in range(n_nodes)]
    tasks: list[Task] = []
    total = sum(len(order) for order in schedule.orders)
    expected = sum(2 * model.n_microbatches * model.n_stages for model in models)
    if total != expected:
        return None
    progressed = True
    while progressed:
        progressed = False
        for node in range(n_nodes):
            order = schedule.orders[node]
            while next_index[node] < len(order):
                slot = order[next_index[node]]
                if not 0 <= slot.model < len(models):
                    return None
                stage = node_stage[node][slot.model]
                model = models[slot.model]
                if stage < 0:
                    return None
                count = done_f[node][slot.model] if slot.forward else done_b[node][slot.model]
                if count >= model.n_microbatches:
                    return None
                chain = stage if slot.forward else 2 * model.n_stages - 1 - stage
                ready = 0 if chain == 0 else chain_end[slot.model][count][chain - 1]
                if ready < 0:
                    break
                start = max(ready, node_free[node])
                finish = start + _task_time(model, stage, slot.forward)
                chain_end[slot.model][count][chain] = finish
                node_free[node] = finish
                next_index[node] += 1
                if slot.forward:
                    done_f[node][slot.model] += 1
                else:
                    done_b[node][slot.model] += 1
                tasks.append(Task(slot.model, count, stage, slot.forward, node, start, finish))
                progressed = True
    if len(tasks) != total:
        return None  # deadlock: some node waits on a task that can never run
    makespan = max((task.finish for task in tasks), default=0)
    return Timeline(
        tasks=tuple(tasks),
        makespan=makespan,
        sum_finish=sum(task.finish for task in tasks),
        peak_memory=peak_memory(problem, tasks),
    )


def peak_memory(problem: PipelineProblem, tasks: Sequence[Task]) -> tuple[float, ...]:
    """Per-node peak of held activations: +mem at a forward's start, -mem at its backward's end."""
    events: list[list[tuple[int, int, float]]] = [[] for _ in range(problem.n_nodes)]
    for task in tasks:
        mem = problem.models[task.model].activation_memory[task.stage]
        if task.forward:
            events[task.node].append((task.start, 1, mem))
        else:
            events[task.node].append((task.finish, 0, -mem))
    peaks = []
    for node_events in events:
        held = 0.0
        peak = 0.0
        for _, _, delta in sorted(node_events):  # frees (kind 0) sort before allocations at a tie
            held += delta
            peak = max(peak, held)
        peaks.append(peak)
    return tuple(peaks)


def validate(problem: PipelineProblem, schedule: Schedule, timeline: Timeline | None = None) -> list[str]:
    """Everything wrong with ``schedule`` (and ``timeline``, default: its simulation); [] if valid.

    Checks each node's slot multiset, deadlock freedom, then on the timeline: every task starts
    after its chain predecessor finished, tasks on one node do not overlap, each node's tasks run
    in its list's order, and peak activation memory stays within ``problem.memory_limit``.
    """
    problems: list[str] = []
    if len(schedule.orders) != problem.n_nodes:
        return [f"schedule has {len(schedule.orders)} node lists, problem has {problem.n_nodes} nodes"]
    for node, order in enumerate(schedule.orders):
        want = problem.slot_counts(node)
        for forward in (True, False):
            got: dict[int, int] = {}
            for slot in order:
                if slot.forward == forward:
                    got[slot.model] = got.get(slot.model, 0) + 1
            if got != want:
                kind = "forward" if forward else "backward"
                problems.append(f"node {node}: {kind} slots per model {got} != expected {want}")
    if problems:
        return problems
    if timeline is None:
        timeline = simulate(problem, schedule)
        if timeline is None:
            return ["schedule deadlocks: some node waits for a task that can never run"]
    finish: dict[tuple[int, int, int, bool], int] = {}
    for task in timeline.tasks:
        finish[(task.model, task.microbatch, task.stage, task.forward)] = task.finish
    for task in timeline.tasks:
        model = problem.models[task.model]
        if model.stage_nodes[task.stage] != task.node:
            problems.append(
                f"{task}: stage {task.stage} of {model.name} belongs on node {model.stage_nodes[task.stage]}"
            )
        if task.forward:
            pred = (task.model, task.microbatch, task.stage - 1, True) if task.stage > 0 else None
        elif task.stage == model.n_stages - 1:
            pred = (task.model, task.microbatch, task.stage, True)
        else:
            pred = (task.model, task.microbatch, task.stage + 1, False)
        if pred is not None and (pred not in finish or finish[pred] > task.start):
            problems.append(
                f"{model.name} mb{task.microbatch} stage {task.stage} "
                f"{'F' if task.forward else 'B'} starts at {task.start} before its input {pred}"
            )
    for node in range(problem.n_nodes):
        on_node = sorted((t for t in timeline.tasks if t.node == node), key=lambda t: (t.start, t.finish))
        for before, after in itertools.pairwise(on_node):
            if after.start < before.finish:
                problems.append(f"node {node}: tasks overlap at {after.start} ({before} / {after})")
        executed = [Slot(t.model, t.forward) for t in on_node]
        if executed != list(schedule.orders[node]):
            problems.append(f"node {node}: executed order differs from its task list")
    if problem.memory_limit is not None:
        for node, peak in enumerate(timeline.peak_memory):
            if peak > problem.memory_limit + 1e-9:
                problems.append(f"node {node}: peak activation memory {peak} > limit {problem.memory_limit}")
    return problems


def one_f_one_b_order(model: PipelineModel, stage: int) -> list[bool]:
    """1F1B for one stage: ``S-1-s`` warm-up forwards, then alternate F/B, then drain Bs."""
    warmup = min(model.n_stages - 1 - stage, model.n_microbatches)
    order = [True] * warmup
    for _ in range(model.n_microbatches - warmup):
        order += [True, False]
    return order + [False] * warmup


def sequential_schedule(problem: PipelineProblem, style: str = "1f1b") -> Schedule:
    """Each model trained alone, one after another in ``problem.models`` order (the unfused baseline).

    ``style`` is ``"1f1b"`` or ``"gpipe"`` (all forwards, then all backwards).
    """
    if style not in ("1f1b", "gpipe"):
        raise ValueError(f"style must be '1f1b' or 'gpipe', got {style!r}")
    orders: list[tuple[Slot, ...]] = []
    for node in range(problem.n_nodes):
        order: list[Slot] = []
        for m, model in enumerate(problem.models):
            stage = model.stage_on(node)
            if stage is None:
                continue
            if style == "1f1b":
                order += [Slot(m, f) for f in one_f_one_b_order(model, stage)]
            else:
                order += [Slot(m, True)] * model.n_microbatches + [Slot(m, False)] * model.n_microbatches
        orders.append(tuple(order))
    return Schedule(tuple(orders))


def all_forward_first_schedule(problem: PipelineProblem) -> Schedule:
    """FlexFusion's initial state "FFFFBBBB": every model's forwards, then every backward."""
    orders = []
    for node in range(problem.n_nodes):
        counts = problem.slot_counts(node)
        fwd = [Slot(m, True) for m, n in counts.items() for _ in range(n)]
        bwd = [Slot(m, False) for m, n in counts.items() for _ in range(n)]
        orders.append(tuple(fwd + bwd))
    return Schedule(tuple(orders))


def lower_bound(problem: PipelineProblem) -> int:
    """A makespan no schedule can beat: the largest of four relaxations.

    1. per model, its critical path through its slowest stage: the first micro-batch reaches
       stage ``s`` after the forwards before it, the stage then does ``M`` micro-batches of F+B,
       and the last backward still has to run on the stages before it;
    2. total work divided by the number of nodes;
    3. a node's own work;
    4. a node's own work plus the earliest any task can arrive there and the shortest tail of
       backward work that must follow its last task elsewhere.
    """
    bound = 0
    for model in problem.models:
        for s in range(model.n_stages):
            head = sum(model.forward_time[:s])
            tail = sum(model.backward_time[:s])
            body = model.n_microbatches * (model.forward_time[s] + model.backward_time[s])
            bound = max(bound, head + body + tail)
    work = [0] * problem.n_nodes
    arrive = [math.inf] * problem.n_nodes
    leave = [math.inf] * problem.n_nodes
    for model in problem.models:
        for s, node in enumerate(model.stage_nodes):
            work[node] += model.n_microbatches * (model.forward_time[s] + model.backward_time[s])
            arrive[node] = min(arrive[node], sum(model.forward_time[:s]))
            leave[node] = min(leave[node], sum(model.backward_time[:s]))
    bound = max(bound, math.ceil(sum(work) / problem.n_nodes), *work)
    for node in range(problem.n_nodes):
        if work[node]:
            bound = max(bound, int(arrive[node] + work[node] + leave[node]))
    return bound


def balance_microbatches(lengths: Sequence[int], n_microbatches: int) -> list[list[int]]:
    """Split samples into ``n_microbatches`` groups of similar *padded* cost.

    A micro-batch is padded to its longest sample, so its cost is ``size * max_length``. Sorting
    by length and cutting into contiguous groups keeps padding low; the cut points minimise the
    most expensive group (exact dynamic programme, O(M n^2)). Equal-cost micro-batches are what
    the pipeline schedule assumes, and they also balance work across pipeline flushes (RLHFuse
    balances its DP mini-batches by length for the same reason). Returns indices into
    ``lengths``, longest samples first.
    """
    n = len(lengths)
    if not 1 <= n_microbatches <= n:
        raise ValueError(f"cannot split {n} samples into {n_microbatches} micro-batches")
    order = sorted(range(n), key=lambda i: (-lengths[i], i))
    sorted_len = [lengths[i] for i in order]

    def cost(a: int, b: int) -> int:  # group order[a:b], longest first
        return (b - a) * sorted_len[a]

    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(n_microbatches + 1)]
    cut = [[0] * (n + 1) for _ in range(n_microbatches + 1)]
    best[0][0] = 0
    for g in range(1, n_microbatches + 1):
        for b in range(g, n + 1):
            for a in range(g - 1, b):
                value = max(best[g - 1][a], cost(a, b))
                if value < best[g][b]:
                    best[g][b], cut[g][b] = value, a
    groups: list[list[int]] = []
    b = n
    for g in range(n_microbatches, 0, -1):
        a = cut[g][b]
        groups.append(order[a:b])
        b = a
    return groups[::-1]
