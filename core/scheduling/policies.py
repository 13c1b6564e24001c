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
``slo_goodput``      admission control for SLO goodput (``core.scheduling.goodput``): lengths as
                     distributions, early reject / reroute / shorten of requests that cannot meet
                     their deadline, memory-aware admission, priorities by SLO class with aging.

Memory. Every policy keeps a paged KV ledger (``core.scheduling.kv``). Continuous policies hold
blocks for each running request's context and grow them one token at a time; when a request
cannot grow, a victim is preempted (``_victims``: vLLM preempts the most recently admitted) by
recomputation (its KV is dropped; on resumption its prompt *and* generated tokens are prefilled
again) or by swapping (its KV moves to host memory and comes back without a prefill). The
static policy reserves each request's worst case (prompt + max_tokens) at admission, as request-
level engines do, and never preempts.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from core.scheduling.cost import StepCostModel
from core.scheduling.kv import BlockLedger, KvBudget
from core.scheduling.state import RequestStatus, SchedRequest

VerdictAction = Literal["reject", "reroute", "shorten"]


@dataclass(frozen=True)
class Verdict:
    """An admission-control decision about a waiting request, with the reason the client sees."""

    request_id: str
    action: VerdictAction
    """``reject`` (answered now, not served), ``reroute`` (handed to a cheaper model) or ``shorten``
    (served with fewer max tokens; the request stays queued)."""
    reason: str
    max_tokens: int | None = None
    """The new cap of a shortened request."""


@dataclass(frozen=True)
class Plan:
    """One iteration's work.

    Invariants: ``admitted`` and ``resumed`` are disjoint subsets of ``batch`` in the same order;
    ``preempted`` is disjoint from ``batch``; rejected and rerouted requests in ``verdicts`` are no
    longer known to the policy.
    """

    batch: tuple[str, ...]
    """Every request that computes this iteration, in engine row order."""
    admitted: tuple[str, ...] = ()
    """Requests that join now and need a prefill (new ones, and preempted ones recomputed)."""
    resumed: tuple[str, ...] = ()
    """Preempted requests whose swapped-out KV comes back now (they decode, no prefill)."""
    preempted: tuple[str, ...] = ()
    """Requests taken out of the engine before this iteration (their KV freed or swapped out)."""
    verdicts: tuple[Verdict, ...] = ()

    @property
    def is_empty(self) -> bool:
        return not self.batch

    @property
    def rejected(self) -> tuple[Verdict, ...]:
        """Verdicts that end a request here (rejected or rerouted)."""
        return tuple(v for v in self.verdicts if v.action != "shorten")


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
    """SLO-ODBS and SLO-goodput: refuse admissions that would make an on-track running request late."""
    kv: KvBudget = field(default_factory=KvBudget)
    """The worker's paged KV budget (unlimited by default)."""
    preemption: Literal["recompute", "swap"] = "recompute"
    """How a preempted request gives up its KV (swap needs ``kv.swap_blocks`` and an engine that swaps)."""
    finish_quantile: float = 0.5
    """SLO-goodput: quantile of the remaining length used to predict when a request finishes."""
    reserve_quantile: float = 0.9
    """SLO-goodput: quantile of the final length whose KV must fit at admission (memory-aware)."""
    slo_classes: tuple[str, ...] = ("interactive", "standard", "batch")
    """SLO-goodput: classes from most to least urgent; unknown classes rank in the middle."""
    aging_s: float = 60.0
    """SLO-goodput: waiting this long promotes a request by one class, so no class starves."""
    admission_control: bool = True
    """SLO-goodput: reject, reroute or shorten requests that cannot meet their deadline."""
    shorten_min_tokens: int = 0
    """SLO-goodput: shorten a hopeless request to the tokens that still fit if that is at least this
    many (0 = never shorten)."""

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.max_prefill_tokens < 1:
            raise ValueError(f"max_batch={self.max_batch} and max_prefill_tokens={self.max_prefill_tokens} "
                             "must be >= 1")
        if self.length_weight < 0 or self.max_padding_tokens < 0:
            raise ValueError(f"length_weight={self.length_weight} and max_padding_tokens="
                             f"{self.max_padding_tokens} must be >= 0")
        if not (0 < self.finish_quantile < 1 and 0 < self.reserve_quantile <= 1):
            raise ValueError(f"finish_quantile={self.finish_quantile} must be in (0, 1) and "
                             f"reserve_quantile={self.reserve_quantile} in (0, 1]")
        if self.aging_s <= 0 or self.shorten_min_tokens < 0:
            raise ValueError(f"aging_s={self.aging_s} must be > 0 and shorten_min_tokens="
                             f"{self.shorten_min_tokens} >= 0")
        if self.preemption not in ("recompute", "swap"):
            raise ValueError(f"preemption={self.preemption!r} must be 'recompute' or 'swap'")


class Scheduler(ABC):
    """Owns the waiting queue, the running rows and the KV ledger; never touches an engine."""

    name: ClassVar[str]
    reserves_worst_case: ClassVar[bool] = False
    """Reserve prompt + max_tokens of KV at admission instead of growing (never preempts)."""

    def __init__(self, config: SchedulerConfig | None = None, cost: StepCostModel | None = None) -> None:
        self.config = config or SchedulerConfig()
        self.cost = cost or StepCostModel.reference_cpu()
        """Read at every decision: the serving loop may replace it as its online calibration moves."""
        self.waiting: dict[str, SchedRequest] = {}
        """Insertion (arrival) ordered; preempted requests go back to the front."""
        self.running: list[SchedRequest] = []
        """Engine rows in order, including HELD rows of a static batch."""
        self._index: dict[str, SchedRequest] = {}
        self.ledger = BlockLedger(self.config.kv)
        self.preemptions = 0
        """Preemptions so far (all requests)."""

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
        self.ledger.release(request_id)
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

    def backlog_s(self, now: float) -> float:
        """Predicted seconds before a request arriving now could join the batch (a fluid estimate:
        the first running row to finish frees a slot, then the waiting work drains at full batch)."""
        cfg = self.config
        if len(self.running) < cfg.max_batch and not self.waiting:
            return 0.0
        live = [r for r in self.running if r.status is RequestStatus.RUNNING]
        window = max((r.context_tokens for r in self.running), default=0)
        step = self.cost.per_token_s(max(len(self.running), 1), window)
        slot = min((r.remaining_quantile(0.5) for r in live), default=0.0) * step
        queued = sum(r.remaining_quantile(0.5) + 1 for r in self.waiting.values())
        return slot + queued * self.cost.per_token_s(cfg.max_batch, window) / cfg.max_batch

    # --- the two calls of an iteration --------------------------------------------------------
    def schedule(self, now: float) -> Plan:
        """Pick this iteration's rows.

        1. make KV room for every running row's next token, preempting victims if needed;
        2. admission control (``_screen``): verdicts on waiting requests;
        3. admission (``_admit``): waiting requests join, after the running rows, in order.
        Every RUNNING/HELD request is in the batch (a row leaves only by finishing or preemption).
        """
        preempted = [] if self.reserves_worst_case else self._make_room(now)
        verdicts = self._oversized()
        refused = {v.request_id for v in verdicts}
        verdicts += [v for v in self._screen(now) if v.request_id not in refused]
        for v in verdicts:
            if v.action != "shorten":
                req = self._index.pop(v.request_id)
                del self.waiting[v.request_id]
                req.transition(RequestStatus.ABORTED)
        just_preempted = {r.request_id for r in preempted}
        admitted = [r for r in self._admit(now) if r.request_id not in just_preempted]
        joined: list[SchedRequest] = []
        resumed: list[SchedRequest] = []
        for req in admitted:
            if not self._take_blocks(req):
                break  # the policy's own fit check and the ledger disagree: admit no further
            del self.waiting[req.request_id]
            req.transition(RequestStatus.RUNNING)
            if req.admitted_s is None:
                req.admitted_s = now
            (resumed if req.swapped else joined).append(req)
            req.swapped = False
            self.running.append(req)
        return Plan(batch=tuple(r.request_id for r in self.running),
                    admitted=tuple(r.request_id for r in joined), resumed=tuple(r.request_id for r in resumed),
                    preempted=tuple(r.request_id for r in preempted), verdicts=tuple(verdicts))

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
            self.ledger.release(req.request_id)
            done.append(req)
        return done

    # --- memory -------------------------------------------------------------------------------
    def _make_room(self, now: float) -> list[SchedRequest]:
        """Hold KV for every running row's next token; preempt victims while a row cannot grow."""
        preempted: list[SchedRequest] = []
        for req in list(self.running):
            if req.status is not RequestStatus.RUNNING or req in preempted:
                continue
            while not self.ledger.grow(req.request_id, req.context_tokens + 1):
                candidates = [v for v in self._victims(now) if v.status is RequestStatus.RUNNING]
                if candidates == [req]:
                    raise RuntimeError(f"KV budget too small for request {req.request_id!r} alone "
                                       f"({req.context_tokens + 1} tokens of {self._budget_tokens()})")
                victim = candidates[0]
                self._preempt(victim)
                preempted.append(victim)
                if victim is req:
                    break
        return preempted

    def _budget_tokens(self) -> int:
        return self.config.kv.total_blocks * self.config.kv.block_tokens

    def _oversized(self) -> list[Verdict]:
        """Waiting requests whose prompt and cap could never fit the KV budget: rejected, not queued
        forever (a static batch reserves the whole cap, a continuous one grows toward it)."""
        if not self.ledger.budget.limited:
            return []
        limit = self._budget_tokens()
        return [Verdict(r.request_id, "reject", f"rejected: {r.prompt_tokens} prompt tokens + {r.max_tokens} "
                                                f"max tokens exceed the worker's KV budget of {limit} tokens")
                for r in self.waiting.values()
                if r.admitted_s is None and self.ledger.blocks_for(r.prompt_tokens + r.max_tokens)
                > self.config.kv.total_blocks]

    def _preempt(self, req: SchedRequest) -> None:
        self.running.remove(req)
        rid = req.request_id
        swap = self.config.preemption == "swap" and self.ledger.can_swap_out(rid)
        if swap:
            self.ledger.swap_out(rid)
        else:
            self.ledger.release(rid)
        req.swapped = swap
        req.preemptions += 1
        self.preemptions += 1
        req.transition(RequestStatus.WAITING)
        self.waiting = {rid: req, **self.waiting}

    def _kv_fits(self, req: SchedRequest, extra_tokens: float = 0.0, taken: int = 0) -> bool:
        """Whether ``req`` can join now with ``extra_tokens`` of headroom, after ``taken`` blocks are
        promised to requests chosen earlier in this iteration."""
        ledger = self.ledger
        if req.swapped:
            return ledger.blocks_for(req.context_tokens) + taken <= ledger.free
        need = ledger.blocks_for(req.context_tokens + 1 + extra_tokens)
        return need + taken <= ledger.free - ledger.budget.watermark_blocks

    def _blocks_to_join(self, req: SchedRequest) -> int:
        return self.ledger.blocks_for(req.context_tokens + 1)

    def _take_blocks(self, req: SchedRequest) -> bool:
        if req.swapped:
            return self.ledger.swap_in(req.request_id)
        tokens = req.prompt_tokens + req.max_tokens if self.reserves_worst_case else req.context_tokens + 1
        return self.ledger.grow(req.request_id, tokens)

    # --- policy hooks -------------------------------------------------------------------------
    @abstractmethod
    def _admit(self, now: float) -> list[SchedRequest]:
        """Waiting requests that join this iteration, in row order."""

    def _screen(self, now: float) -> list[Verdict]:
        """Admission control: verdicts on waiting requests (none by default)."""
        return []

    def _victims(self, now: float) -> list[SchedRequest]:
        """Running requests in the order they are preempted: vLLM's, the most recently admitted first."""
        return list(reversed(self.running))

    def _completed(self) -> list[SchedRequest]:
        """HELD requests that complete now. Continuous batching: every one, immediately."""
        return [r for r in self.running if r.status is RequestStatus.HELD]

    def _fits_prefill(self, chosen: list[SchedRequest], req: SchedRequest) -> bool:
        longest = max([r.context_tokens for r in chosen] + [req.context_tokens])
        return not chosen or longest * (len(chosen) + 1) <= self.config.max_prefill_tokens


class FcfsStatic(Scheduler):
    name = "fcfs_static"
    reserves_worst_case = True

    def _admit(self, now: float) -> list[SchedRequest]:
        if self.running:
            return []  # a static batch admits nobody until it has completed as a whole
        chosen: list[SchedRequest] = []
        taken = 0
        for req in list(self.waiting.values())[: self.config.max_batch]:
            need = self.ledger.blocks_for(req.prompt_tokens + req.max_tokens)
            if chosen and need + taken > self.ledger.free:
                break
            chosen.append(req)
            taken += need
        return chosen

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
        taken = 0
        for req in self._order(now):
            if len(chosen) >= free or not self._fits_prefill(chosen, req) or not self._kv_fits(req, taken=taken):
                break
            chosen.append(req)
            taken += self._blocks_to_join(req)
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
        taken = 0
        for req in self._order(now):
            rows = len(members)
            if rows >= cfg.max_batch or not self._fits_prefill(chosen, req) or not self._kv_fits(req, taken=taken):
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
            taken += self._blocks_to_join(req)
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
    """A fresh scheduler by policy name (see ``POLICIES``, which ``core.scheduling`` completes with
    ``slo_goodput``)."""
    try:
        cls = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; known: {sorted(POLICIES)}") from None
    return cls(config, cost)
