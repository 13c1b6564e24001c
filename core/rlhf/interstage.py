"""RLHFuse inter-stage fusion: overlap the generation long tail with inference.

Generation and inference are split into per-sample subtasks: a sample's reference/reward/critic
forward depends only on its own generation. ``InterStageScheduler`` is the policy, shaped like
vLLM's scheduler: the executor loop reports progress with ``update(...)`` and asks
``schedule() -> StagePlan`` for what to do next; the same object drives the real worker processes
(``workers/trainer``) and the discrete-event simulator below, which is how ``rt`` is chosen
offline (``choose_rt``).

Policy (``fused=True``):

- while more than ``rt * batch`` samples are unfinished, every instance generates its own samples;
- the first time unfinished samples fall to ``<= rt * batch``, the tail migrates once to
  ``m`` survivors, ``m`` the fewest instances whose batch capacity holds the tail; survivors are
  the instances holding the most live samples (least data moved); the others are freed;
- a free instance (no live samples, not scoring) gets the next micro-batch of finished,
  unscored samples at once, in finish order.

With ``fused=False`` (the baseline) nothing migrates and inference starts only after the last
sample finished: generation -> barrier -> inference.

Samples may also join already finished (``finished=...``): the live trainer scores its training
batch (rollouts that workers served earlier) in the same phase as it generates new samples, so
a freed instance takes those first-come in the same finish order. ``rt`` counts only the
samples that generate here.

Invariant: each sample is in exactly one place at a time (generating on one instance, waiting,
being scored on one instance, or scored), and each instance is either generating, scoring one
micro-batch, or free.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class InterStageConfig:
    """Fusion policy knobs."""

    rt: float = 0.2
    """Migrate when unfinished samples are at most this share of the batch (RLHFuse's Rt)."""
    fused: bool = True
    """False: the unfused baseline (no migration, inference after a barrier)."""
    max_batch_per_instance: int = 64
    """Samples a generation instance can decode at once without slowing down (and hold KV for)."""
    inference_microbatch: int = 4
    """Samples per reference/reward/critic inference task."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.rt <= 1.0:
            raise ValueError(f"rt must be in [0, 1], got {self.rt}")
        if self.max_batch_per_instance < 1 or self.inference_microbatch < 1:
            raise ValueError(
                f"max_batch_per_instance and inference_microbatch must be >= 1, got "
                f"{self.max_batch_per_instance} and {self.inference_microbatch}"
            )


@dataclass(frozen=True)
class Migration:
    """Move live samples (with their KV caches) from ``source`` to ``target``."""

    sample_ids: tuple[int, ...]
    source: int
    target: int


@dataclass(frozen=True)
class InferenceTask:
    """Run reference, reward and critic forwards for ``sample_ids`` on ``instance``."""

    instance: int
    sample_ids: tuple[int, ...]


@dataclass(frozen=True)
class StagePlan:
    migrations: tuple[Migration, ...] = ()
    inference: tuple[InferenceTask, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.migrations and not self.inference


class InterStageScheduler:
    """Which samples migrate where and which instance scores which finished samples."""

    def __init__(
        self, assignment: Mapping[int, int], n_instances: int, cfg: InterStageConfig, finished: Iterable[int] = ()
    ) -> None:
        """``assignment`` maps every sample id to generate to the instance that starts it;
        ``finished`` are samples that need inference only (already generated elsewhere)."""
        ready = list(finished)
        if not assignment and not ready:
            raise ValueError("the batch is empty")
        bad = sorted({i for i in assignment.values() if not 0 <= i < n_instances})
        if bad:
            raise ValueError(f"instances {bad} outside 0..{n_instances - 1}")
        overlap = sorted(set(ready) & set(assignment))
        if overlap or len(set(ready)) != len(ready):
            raise ValueError(f"samples {overlap or ready} are listed twice")
        self.cfg = cfg
        self.n_instances = n_instances
        self.generating_total = len(assignment)
        self.batch_size = len(assignment) + len(ready)
        self.live: list[set[int]] = [set() for _ in range(n_instances)]
        for sample, instance in assignment.items():
            self.live[instance].add(sample)
        self.waiting: list[int] = list(ready)
        """Finished, unscored, unassigned samples in finish order."""
        self.scoring: dict[int, tuple[int, ...]] = {}
        """Instance -> the micro-batch it is scoring."""
        self.scored: set[int] = set()
        self.migrated = False
        self.finish_order: list[int] = []

    @property
    def unfinished(self) -> int:
        return sum(len(s) for s in self.live)

    @property
    def done(self) -> bool:
        return len(self.scored) == self.batch_size

    def is_generating(self, instance: int) -> bool:
        return bool(self.live[instance])

    def update(self, finished: Iterable[int] = (), scored: Iterable[tuple[int, Sequence[int]]] = ()) -> None:
        """Record samples whose generation ended and inference tasks that completed."""
        for sample in finished:
            owner = next((i for i, s in enumerate(self.live) if sample in s), None)
            if owner is None:
                raise ValueError(f"sample {sample} finished but is not generating anywhere")
            self.live[owner].discard(sample)
            self.waiting.append(sample)
            self.finish_order.append(sample)
        for instance, samples in scored:
            if tuple(samples) != self.scoring.get(instance):
                raise ValueError(
                    f"instance {instance} reported {tuple(samples)}, was given {self.scoring.get(instance)}"
                )
            del self.scoring[instance]
            self.scored.update(samples)

    def _plan_migration(self) -> tuple[Migration, ...]:
        cfg = self.cfg
        unfinished = self.unfinished
        if not cfg.fused or self.migrated or unfinished == 0 or unfinished > cfg.rt * self.generating_total:
            return ()
        self.migrated = True
        generating = [i for i in range(self.n_instances) if self.live[i]]
        survivors_needed = max(1, math.ceil(unfinished / cfg.max_batch_per_instance))
        if len(generating) <= survivors_needed:
            return ()
        ranked = sorted(generating, key=lambda i: (-len(self.live[i]), i))
        survivors, leaving = ranked[:survivors_needed], ranked[survivors_needed:]
        incoming: dict[tuple[int, int], list[int]] = {}
        for source in leaving:
            for sample in sorted(self.live[source]):
                target = min(survivors, key=lambda i: (len(self.live[i]), i))
                self.live[target].add(sample)
                incoming.setdefault((source, target), []).append(sample)
            self.live[source].clear()
        return tuple(Migration(tuple(ids), src, dst) for (src, dst), ids in sorted(incoming.items()))

    def schedule(self) -> StagePlan:
        """Next actions; the returned plan is already applied to this scheduler's state."""
        migrations = self._plan_migration()
        tasks: list[InferenceTask] = []
        may_score = self.cfg.fused or self.unfinished == 0
        if may_score:
            for instance in range(self.n_instances):
                if not self.waiting:
                    break
                if self.live[instance] or instance in self.scoring:
                    continue
                take = tuple(self.waiting[: self.cfg.inference_microbatch])
                del self.waiting[: len(take)]
                self.scoring[instance] = take
                tasks.append(InferenceTask(instance, take))
        return StagePlan(migrations=migrations, inference=tuple(tasks))


# --------------------------------------------------------------------------- offline simulation


@dataclass(frozen=True)
class StageCosts:
    """Time model of one instance (seconds), e.g. fitted from measured decode/forward times."""

    decode_step: Callable[[int], float]
    """Time of one decode step at a given batch size (sub-linear: decoding is memory-bound)."""
    inference: Callable[[int, int], float]
    """Time to score a micro-batch of ``n`` samples holding ``tokens`` tokens in total."""
    migrate_per_sample: float = 0.0
    """Time both ends spend moving one sample's KV cache."""


@dataclass(frozen=True)
class SimulationResult:
    makespan: float
    busy: tuple[float, ...]
    """Busy time per instance."""
    migration_time: float | None
    """When the tail migrated (None: never)."""

    @property
    def idle_fraction(self) -> float:
        total = self.makespan * len(self.busy)
        return 0.0 if total == 0 else 1.0 - sum(self.busy) / total


def simulate_generation_and_inference(
    lengths: Sequence[int],
    assignment: Mapping[int, int],
    n_instances: int,
    cfg: InterStageConfig,
    costs: StageCosts,
    *,
    prompt_tokens: int = 0,
) -> SimulationResult:
    """Discrete-event run of the policy: per-instance batched decoding, migration, inference.

    Each generating instance repeats decode steps over its live samples; sample ``i`` finishes
    after ``lengths[i]`` tokens. Events are processed in time order; ties go to lower instance ids.
    """
    sched = InterStageScheduler(assignment, n_instances, cfg)
    produced = [0] * len(lengths)
    busy = [0.0] * n_instances
    free_at = [0.0] * n_instances
    heap: list[tuple[float, int, str]] = []
    running: dict[int, tuple[int, ...]] = {}
    stepping: dict[int, tuple[int, ...]] = {}
    """Instance -> samples in its in-flight decode step (samples migrated in wait for the next)."""
    migration_time: float | None = None
    now = 0.0

    def start_decode(instance: int) -> None:
        stepping[instance] = tuple(sorted(sched.live[instance]))
        step = costs.decode_step(len(stepping[instance]))
        busy[instance] += step
        free_at[instance] = max(free_at[instance], now) + step
        heapq.heappush(heap, (free_at[instance], instance, "decode"))

    def apply(plan: StagePlan) -> None:
        nonlocal migration_time
        for move in plan.migrations:
            migration_time = now
            cost = costs.migrate_per_sample * len(move.sample_ids)
            for end in (move.source, move.target):
                busy[end] += cost
                free_at[end] = max(free_at[end], now) + cost
        for task in plan.inference:
            tokens = sum(prompt_tokens + lengths[s] for s in task.sample_ids)
            t = costs.inference(len(task.sample_ids), tokens)
            busy[task.instance] += t
            free_at[task.instance] = max(free_at[task.instance], now) + t
            running[task.instance] = task.sample_ids
            heapq.heappush(heap, (free_at[task.instance], task.instance, "score"))

    for instance in range(n_instances):
        if sched.live[instance]:
            start_decode(instance)
    apply(sched.schedule())
    while heap:
        now, instance, kind = heapq.heappop(heap)
        if kind == "decode":
            finished = []
            # Samples migrated away mid-step lose that step (conservative); arrivals wait.
            for sample in stepping.pop(instance):
                if sample not in sched.live[instance]:
                    continue
                produced[sample] += 1
                if produced[sample] >= lengths[sample]:
                    finished.append(sample)
            sched.update(finished=sorted(finished))
            apply(sched.schedule())
            if sched.live[instance]:
                start_decode(instance)
        else:
            sched.update(scored=[(instance, running.pop(instance))])
            apply(sched.schedule())
        # A survivor that just received samples but had none live restarts decoding.
        for other in range(n_instances):
            if sched.live[other] and other not in stepping:
                start_decode(other)
    if not sched.done:
        raise RuntimeError("simulation ended with unscored samples")  # broken invariant
    return SimulationResult(makespan=now, busy=tuple(busy), migration_time=migration_time)


def choose_rt(
    length_samples: Sequence[Sequence[int]],
    n_instances: int,
    costs: StageCosts,
    *,
    candidates: Sequence[float] = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5),
    base: InterStageConfig | None = None,
    prompt_tokens: int = 0,
) -> tuple[float, dict[float, float]]:
    """Pick ``rt`` minimising mean simulated time over sampled batches of output lengths.

    RLHFuse tunes Rt offline from the output-length distribution and re-tunes it when the
    distribution drifts; this is that offline step. Returns (best rt, mean makespan per rt).
    """
    base = base or InterStageConfig()
    means: dict[float, float] = {}
    for rt in candidates:
        cfg = InterStageConfig(
            rt=rt,
            fused=True,
            max_batch_per_instance=base.max_batch_per_instance,
            inference_microbatch=base.inference_microbatch,
        )
        total = 0.0
        for lengths in length_samples:
            assignment = round_robin(len(lengths), n_instances)
            total += simulate_generation_and_inference(
                lengths, assignment, n_instances, cfg, costs, prompt_tokens=prompt_tokens
            ).makespan
        means[rt] = total / len(length_samples)
    best = min(means, key=lambda rt: (means[rt], rt))
    return best, means


def round_robin(n_samples: int, n_instances: int) -> dict[int, int]:
    """Sample ``i`` starts on instance ``i % n_instances``."""
    return {i: i % n_instances for i in range(n_samples)}
