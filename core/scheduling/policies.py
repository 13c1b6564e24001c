"""Batching policies with vLLM v1's shape: ``schedule(now) -> Plan``, then ``update(plan, results)``.

There is no prefill or decode phase in a scheduler: each iteration every request in
``Plan.batch`` computes one step (a joining request's step is its prefill, which yields its first
token). The engine loop only does schedule -> execute -> update, and both the real serving loop
and the discrete-event simulator drive the very same policy objects.

Policies (``make_scheduler(name)``):

``fcfs_static``      request-level batching, as UELLM's baseline and HF ``generate``: take up to
                     ``max_batch`` requests in arrival order, run the batch until its longest member
                     finishes, nobody joins meanwhile, and every member completes when the batch does
                     (finished rows stay as padding, state HELD).
``fcfs_continuous``  iteration-level batching in arrival order (vLLM's default policy): finished
                     sequences leave and waiting ones join between any two steps.
``sjf``              continuous, shortest predicted output first (the LTR / SSJF proxy).
``slo_odbs``         UELLM's SLO- and output-driven dynamic batching, run continuously: order by
                     deadline + w * predicted service time; admit under the padding bound; and never
                     admit a request that would make an on-track running request miss its deadline
                     (the batch-size cap follows the SLOs instead of being fixed).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

from core.scheduling.cost import StepCostModel
from core.scheduling.state import RequestStatus, SchedRequest


@dataclass(frozen=True)
class Plan:
    """One iteration's work. Invariant: ``admitted`` is a subset of ``batch``, in the same order."""

    batch: tuple[str, ...]
    """Every request that computes this iteration, in engine row order."""
    admitted: tuple[str, ...] = ()
    """Requests that join now and need their prefill."""

    @property
    def is_empty(self) -> bool:
        return not self.batch


@dataclass(frozen=True)
class StepResult:
    """What the engine did for one request in one iteration."""

    new_tokens: int = 1
    finished: bool = False
    """Generation has ended for this request (EOS, stop string or max_tokens)."""


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch: int = 32
    """Rows per iteration (vLLM's ``max_num_seqs``); also the static batch size."""
    max_prefill_tokens: int = 4096
    """Padded prompt tokens one iteration may prefill (vLLM's ``max_num_batched_tokens``)."""
    length_weight: float = 0.5
    """SLO-ODBS sort key weight on predicted service time (UELLM's released code uses 0.5)."""
    max_padding_tokens: int = 12500
    """SLO-ODBS padding bound: (ctx_q - max ctx in batch)^+ * (|batch|+1) must stay below this
    (UELLM's threshold 15000 / overhead factor 1.2, in token slots)."""
    protect_slo: bool = True
    """SLO-ODBS: refuse admissions that would make an on-track running request late."""

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.max_prefill_tokens < 1:
            raise ValueError(f"max_batch={self.max_batch} and max_prefill_tokens={self.max_prefill_tokens} "
                             "must be >= 1")
        if self.length_weight < 0 or self.max_padding_tokens < 0:
            raise ValueError(f"length_weight={self.length_weight} and max_padding_tokens="
                             f"{self.max_padding_tokens} must be >= 0")


class Scheduler(ABC):
    """Owns the waiting queue and the running rows; never touches an engine."""

    name: ClassVar[str]

    def __init__(self, config: SchedulerConfig | None = None, cost: StepCostModel | None = None) -> None:
        self.config = config or SchedulerConfig()
        self.cost = cost or StepCostModel.reference_cpu()
        self.waiting: dict[str, SchedRequest] = {}
        """Insertion (arrival) ordered."""
        self.running: list[SchedRequest] = []
        """Engine rows in order, including HELD rows of a static batch."""
        self._index: dict[str, SchedRequest] = {}

    # --- queue management -------------------------------------------------------------------
    def add(self, req: SchedRequest) -> None:
        if req.request_id in self._index:
            raise ValueError(f"request {req.request_id!r} is already scheduled")
        if req.status is not RequestStatus.WAITING:
            raise ValueError(f"request {req.request_id!r} must be WAITING to be added, is {req.status.value}")
        self.waiting[req.request_id] = req
        self._index[req.request_id] = req

    def get(self, request_id: str) -> SchedRequest | None:
        return self._index.get(request_id)

    def abort(self, request_id: str) -> SchedRequest | None:
        """Drop a request wherever it is; returns it (the caller releases its engine row) or None."""
        req = self._index.pop(request_id, None)
        if req is None:
            return None
        self.waiting.pop(request_id, None)
        if req in self.running:
            self.running.remove(req)
        req.transition(RequestStatus.ABORTED)
        return req

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # --- the two calls of an iteration --------------------------------------------------------
    def schedule(self, now: float) -> Plan:
        """Pick this iteration's rows. Every RUNNING/HELD request is in the batch (rows are never
        paused); new rows are appended after them in admission order."""
        admitted = self._admit(now)
        for req in admitted:
            del self.waiting[req.request_id]
            req.transition(RequestStatus.RUNNING)
            req.admitted_s = now
            self.running.append(req)
        return Plan(batch=tuple(r.request_id for r in self.running),
                    admitted=tuple(r.request_id for r in admitted))

    def update(self, plan: Plan, results: Mapping[str, StepResult], now: float) -> list[SchedRequest]:
        """Apply one iteration's results; returns the requests that completed (to finalise and release)."""
        done: list[SchedRequest] = []
        for rid in plan.batch:
            req = self._index.get(rid)
            if req is None or req.status not in (RequestStatus.RUNNING, RequestStatus.HELD):
                continue  # aborted between schedule and update
            res = results.get(rid)
            if res is None:
                raise ValueError(f"no result for scheduled request {rid!r}")
            if req.status is RequestStatus.RUNNING:
                req.generated += res.new_tokens
                if res.finished:
                    req.transition(RequestStatus.HELD)
        for req in self._completed():
            req.transition(RequestStatus.FINISHED)
            req.finished_s = now
            self.running.remove(req)
            del self._index[req.request_id]
            done.append(req)
        return done

    # --- policy hooks -------------------------------------------------------------------------
    @abstractmethod
    def _admit(self, now: float) -> list[SchedRequest]:
        """Waiting requests that join this iteration, in row order."""

    def _completed(self) -> list[SchedRequest]:
        """HELD requests that complete now. Continuous batching: every one, immediately."""
        return [r for r in self.running if r.status is RequestStatus.HELD]

    def _fits_prefill(self, chosen: list[SchedRequest], req: SchedRequest) -> bool:
        longest = max([r.prompt_tokens for r in chosen] + [req.prompt_tokens])
        return not chosen or longest * (len(chosen) + 1) <= self.config.max_prefill_tokens


class FcfsStatic(Scheduler):
    name = "fcfs_static"

    def _admit(self, now: float) -> list[SchedRequest]:
        if self.running:
            return []  # a static batch admits nobody until it has completed as a whole
        return list(self.waiting.values())[: self.config.max_batch]

    def _completed(self) -> list[SchedRequest]:
        if self.running and all(r.status is RequestStatus.HELD for r in self.running):
            return list(self.running)
        return []


class _Continuous(Scheduler):
    """Iteration-level batching: fill free rows from the waiting queue in ``_order``."""

    def _order(self, now: float) -> list[SchedRequest]:
        return list(self.waiting.values())

    def _admit(self, now: float) -> list[SchedRequest]:
        chosen: list[SchedRequest] = []
        free = self.config.max_batch - len(self.running)
        for req in self._order(now):
            if len(chosen) >= free or not self._fits_prefill(chosen, req):
                break
            chosen.append(req)
        return chosen


class FcfsContinuous(_Continuous):
    name = "fcfs_continuous"


class ShortestJobFirst(_Continuous):
    name = "sjf"

    def _order(self, now: float) -> list[SchedRequest]:
        return sorted(self.waiting.values(), key=lambda r: (r.predicted_tokens, r.arrival_s))


class SloOdbs(_Continuous):
    """SLO-ODBS on iteration-level batching.

    Key: ``deadline + w * predicted_tokens * t1`` with t1 the isolated per-token decode time,
    i.e. UELLM's ``SLO + 0.5 * len`` with the length converted to seconds. Requests that cannot
    meet their deadline even if they joined the current batch right now are *hopeless* and go
    behind every feasible one (EDF without this collapses under overload: it keeps serving the
    already-late and makes them all miss by a little).

    Admission stops at the first candidate that breaks a rule, so the order is respected:
    the batch cap, the prefill budget, the padding bound on predicted final context, and the SLO
    guard: with B rows, a running request finishes at about now + remaining * decode(B, W);
    a candidate joins only if every running request that is on track at B stays on track at B+1.
    """

    name = "slo_odbs"

    def _t1(self, req: SchedRequest) -> float:
        return self.cost.decode_s(1, req.prompt_tokens + int(req.predicted_tokens))

    def _hopeless(self, req: SchedRequest, now: float, rows: int) -> bool:
        if math.isinf(req.deadline_s):
            return False
        step = self.cost.decode_s(rows, req.prompt_tokens + int(req.predicted_tokens))
        return now + self.cost.prefill_s(1, req.prompt_tokens) + req.predicted_tokens * step > req.deadline_s

    def _order(self, now: float) -> list[SchedRequest]:
        w = self.config.length_weight
        rows = len(self.running) + 1

        def key(r: SchedRequest) -> tuple[bool, float, float]:
            deadline = r.deadline_s if math.isfinite(r.deadline_s) else 1e18
            return (self._hopeless(r, now, rows), deadline + w * r.predicted_tokens * self._t1(r), r.arrival_s)

        return sorted(self.waiting.values(), key=key)

    def _final_ctx(self, req: SchedRequest) -> float:
        return req.prompt_tokens + max(req.predicted_tokens, req.generated)

    def _finish_estimate(self, req: SchedRequest, now: float, rows: int, window: float) -> float:
        return now + req.remaining_estimate() * self.cost.decode_s(rows, int(window))

    def _admit(self, now: float) -> list[SchedRequest]:
        cfg = self.config
        chosen: list[SchedRequest] = []
        members = list(self.running)
        # The KV window a member will see near its end: the batch's largest predicted final context.
        window = max((self._final_ctx(r) for r in members), default=0.0)
        for req in self._order(now):
            rows = len(members)
            if rows >= cfg.max_batch or not self._fits_prefill(chosen, req):
                break
            grown = max(self._final_ctx(req) - window, 0.0)
            if members and grown * (rows + 1) > cfg.max_padding_tokens:
                break
            new_window = window + grown
            if cfg.protect_slo and not self._keeps_slos(members, now, rows, window, new_window):
                break
            chosen.append(req)
            members.append(req)
            window = new_window
        return chosen

    def _keeps_slos(self, members: list[SchedRequest], now: float, rows: int, window: float,
                    new_window: float) -> bool:
        for m in members:
            if math.isinf(m.deadline_s):
                continue
            on_track = self._finish_estimate(m, now, rows, window) <= m.deadline_s
            if on_track and self._finish_estimate(m, now, rows + 1, new_window) > m.deadline_s:
                return False
        return True


POLICIES: dict[str, type[Scheduler]] = {
    cls.name: cls for cls in (SloOdbs, FcfsStatic, FcfsContinuous, ShortestJobFirst)
}


def make_scheduler(name: str, config: SchedulerConfig | None = None,
                   cost: StepCostModel | None = None) -> Scheduler:
    """A fresh scheduler by policy name (``slo_odbs``, ``fcfs_static``, ``fcfs_continuous``, ``sjf``)."""
    try:
        cls = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; known: {sorted(POLICIES)}") from None
    return cls(config, cost)
