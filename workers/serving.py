"""The synchronous serving loop a worker wraps: admit requests, step the engine, emit events.

One ``step()`` is one iteration, exactly schedule -> execute -> update (vLLM v1's EngineCore):

1. drain the inbox (requests and aborts handed in by other threads), tokenise, predict lengths
   (as distributions);
2. ``plan = policy.schedule(now)``; admission verdicts become finals at once (rejected,
   rerouted) or a lower cap (shortened); preempted requests leave the engine (recompute or swap);
   newly admitted requests are handed to the engine;
3. ``outputs = engine.execute(plan.batch)``; stream each text delta as a ``ChunkEvent``;
4. ``policy.update(plan, results)``; every completed request is released from the engine, gets
   one ``FinalEvent`` and teaches the length predictor its true output length;
5. the iteration's shape and engine time teach the online cost model, which the policy reads.

Threading: ``admit`` and ``abort`` only append to a thread-safe inbox, so an asyncio thread can
call them without waiting for a step; ``step`` and the weight-changing calls (adapters,
checkpoints) hold one lock, so weights never change in the middle of an iteration. There is no
asyncio in here: the Kafka worker runs ``step`` in a thread.
"""

from __future__ import annotations

import dataclasses
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from core.scheduling.calibration import OnlineCostConfig, OnlineCostModel
from core.scheduling.cost import StepCostModel
from core.scheduling.policies import Plan, SchedulerConfig, StepResult, Verdict, make_scheduler
from core.scheduling.predictor import LengthPredictor
from core.scheduling.state import SchedRequest
from workers.engines.base import BASE_ADAPTER, Engine, EngineRequest, SamplingParams


@dataclass(frozen=True)
class ServeRequest:
    request_id: str
    prompt: str
    sampling: SamplingParams = field(default_factory=SamplingParams)
    adapter: str | None = None
    """Content hash of a loaded LoRA adapter; None = base model. An adapter the engine has not
    loaded falls back to the base model (the final's ``adapter_version`` is then "")."""
    slo_s: float | None = None
    """Seconds after arrival by which the final response is due; None = no SLO."""
    slo_class: str = ""
    arrival_s: float | None = None
    """Arrival on the loop's clock; None = when ``step`` first sees it."""
    prompt_ids: tuple[int, ...] | None = None
    """Already tokenised prompt (skips the chat template)."""
    reroutable: bool = False
    """A cheaper model may take it if it cannot meet its SLO here (the final says ``rerouted``)."""


@dataclass(frozen=True)
class ChunkEvent:
    request_id: str
    index: int
    """0, 1, 2, ... per request, in order."""
    text: str


@dataclass(frozen=True)
class FinalEvent:
    request_id: str
    text: str
    prompt_tokens: int
    output_tokens: int
    queue_s: float
    """Arrival to admission into a batch."""
    first_token_s: float
    """Arrival to the first generated token."""
    total_s: float
    """Arrival to completion."""
    finish_reason: str
    """``stop``, ``length``, ``rejected`` or ``rerouted`` (admission control: not served here)."""
    adapter_version: str
    """Adapter hash used, or "" for the base model."""
    model_version: str
    """Base weights version when the request started."""
    predicted_tokens: float
    slo_met: bool | None
    """None when the request had no SLO."""
    prompt_token_ids: tuple[int, ...] = ()
    output_token_ids: tuple[int, ...] = ()
    output_logprobs: tuple[float, ...] = ()
    """Per generated token, under the model that generated it (empty if the engine cannot say)."""
    note: str = ""
    """Why admission control rejected, rerouted or shortened the request ("" = served as asked)."""
    preemptions: int = 0


ServeEvent = ChunkEvent | FinalEvent


@dataclass(frozen=True)
class ServingConfig:
    policy: str = "slo_odbs"
    """``slo_odbs``, ``fcfs_static``, ``fcfs_continuous`` or ``sjf``."""
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    clamp_prediction_to_max_tokens: bool = True
    """A request cannot outgrow ``max_tokens``; benchmarks that set max_tokens to the true
    length turn this off so the scheduler does not see the answer."""
    learn_online: bool = True
    """Teach the predictor each completed request's true length."""
    rate_window_s: float = 10.0
    """Window of the tokens/s figure in ``stats()``."""
    online_cost: OnlineCostConfig | None = field(default_factory=OnlineCostConfig)
    """Calibrate the policy's step-cost model from this loop's own iterations; None = keep the given one."""


@dataclass
class _Live:
    req: ServeRequest
    prompt_ids: tuple[int, ...]
    arrival_s: float
    predicted: float
    admitted_s: float | None = None
    first_token_s: float | None = None
    chunks: int = 0
    parts: list[str] = field(default_factory=list)
    reason: str = "length"
    model_version: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    note: str = ""
    in_engine: bool = False
    """Submitted to the engine (a preempted request stays submitted)."""


class ServingLoop:
    def __init__(self, engine: Engine, predictor: LengthPredictor | None = None,
                 config: ServingConfig | None = None, cost: StepCostModel | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.engine = engine
        self.predictor = predictor or LengthPredictor()
        self.config = config or ServingConfig()
        self.clock = clock
        sched = self.config.scheduler
        if sched.kv.limited and not engine.supports_preemption:
            raise ValueError(f"a KV budget needs an engine that can preempt; {type(engine).__name__} cannot")
        if sched.preemption == "swap" and not engine.supports_swap:
            raise ValueError(f"preemption='swap' needs an engine that swaps; {type(engine).__name__} cannot")
        self.scheduler = make_scheduler(self.config.policy, sched, cost)
        self.calibration = (OnlineCostModel(self.scheduler.cost, self.config.online_cost)
                            if self.config.online_cost is not None else None)
        self._live: dict[str, _Live] = {}
        self._inbox: deque[tuple[str, Any]] = deque()
        self._lock = threading.Lock()
        self._rate: deque[tuple[float, int]] = deque()
        self._lengths: deque[int] = deque(maxlen=200)
        self._ctx: dict[str, int] = {}  # KV tokens of each resident row, for the cost model's window
        self.steps = 0
        self.verdicts: dict[str, int] = {"reject": 0, "reroute": 0, "shorten": 0}

    # --- thread-safe entry points ------------------------------------------------------------
    def admit(self, request: ServeRequest) -> None:
        """Queue a request (any thread). A request id that is already live is ignored."""
        self._inbox.append(("admit", request))

    def abort(self, request_id: str) -> None:
        """Drop a request wherever it is (any thread); it gets no final event."""
        self._inbox.append(("abort", request_id))

    @property
    def queue_length(self) -> int:
        return self.scheduler.num_waiting + sum(1 for kind, _ in list(self._inbox) if kind == "admit")

    @property
    def running(self) -> int:
        return self.scheduler.num_running

    def has_work(self) -> bool:
        return bool(self._inbox) or self.scheduler.has_work()

    # --- the iteration --------------------------------------------------------------------------
    def step(self) -> list[ServeEvent]:
        with self._lock:
            wall = self.clock()
            self._drain()
            plan = self.scheduler.schedule(self.clock())
            events: list[ServeEvent] = [final for v in plan.verdicts if (final := self._apply_verdict(v)) is not None]
            for rid in plan.preempted:
                sreq = self.scheduler.get(rid)
                self.engine.preempt(rid, swap=bool(sreq is not None and sreq.swapped))
                self._ctx.pop(rid, None)
            if plan.is_empty:
                return events
            start = self.clock()
            for rid in plan.admitted:
                live = self._live[rid]
                if live.admitted_s is None:
                    live.admitted_s = start
                if not live.in_engine:  # a preempted request is resumed by the engine itself
                    live.model_version = self.engine.model_version
                    self.engine.submit(EngineRequest(rid, live.prompt_ids, live.req.sampling, live.req.adapter))
                    live.in_engine = True
            shape = self._shape(plan)
            outputs = self.engine.execute(plan.batch)
            now = self.clock()
            self._learn_cost(shape, now - start, (start - wall))
            self.steps += 1
            results: dict[str, StepResult] = {}
            produced = 0
            for rid in plan.batch:
                out = outputs[rid]
                live = self._live[rid]
                if out.token_ids and live.first_token_s is None:
                    live.first_token_s = now
                produced += len(out.token_ids)
                live.token_ids.extend(out.token_ids)
                live.logprobs.extend(out.logprobs)
                if out.text:
                    events.append(ChunkEvent(rid, live.chunks, out.text))
                    live.chunks += 1
                    live.parts.append(out.text)
                if out.finished and out.finish_reason:
                    live.reason = out.finish_reason
                results[rid] = StepResult(new_tokens=len(out.token_ids), finished=out.finished)
            self._rate.append((now, produced))
            for req in self.scheduler.update(plan, results, now):
                events.append(self._finish(req, now))
            return events

    def _apply_verdict(self, v: Verdict) -> FinalEvent | None:
        """A shortened request gets its new cap; a rejected or rerouted one its final, now."""
        self.verdicts[v.action] += 1
        live = self._live[v.request_id]
        live.note = v.reason
        if v.action == "shorten":
            assert v.max_tokens is not None
            live.req = dataclasses.replace(live.req, sampling=dataclasses.replace(live.req.sampling,
                                                                                   max_tokens=v.max_tokens))
            return None
        del self._live[v.request_id]
        now = self.clock()
        return FinalEvent(
            request_id=v.request_id, text="", prompt_tokens=len(live.prompt_ids), output_tokens=0,
            queue_s=now - live.arrival_s, first_token_s=now - live.arrival_s, total_s=now - live.arrival_s,
            finish_reason="rejected" if v.action == "reject" else "rerouted", adapter_version="",
            model_version=self.engine.model_version, predicted_tokens=live.predicted, slo_met=False,
            prompt_token_ids=live.prompt_ids, note=v.reason)

    def _shape(self, plan: Plan) -> tuple[int, int, int, int]:
        """(decode rows, KV window, prefill rows, longest prefill) of the iteration about to run."""
        joining = set(plan.admitted)
        decoding = [rid for rid in plan.batch if rid not in joining]
        window = max((self._ctx.get(rid, 0) + 1 for rid in decoding), default=0)
        prefill = {}
        for rid in plan.admitted:
            sreq = self.scheduler.get(rid)
            prefill[rid] = sreq.context_tokens if sreq is not None else len(self._live[rid].prompt_ids)
        for rid in plan.batch:
            self._ctx[rid] = prefill[rid] if rid in joining else self._ctx.get(rid, 0) + 1
        return len(decoding), window, len(prefill), max(prefill.values(), default=0)

    def _learn_cost(self, shape: tuple[int, int, int, int], engine_s: float, outside_s: float) -> None:
        if self.calibration is not None and self.calibration.observe(*shape, engine_s, overhead_s=outside_s):
            self.scheduler.cost = self.calibration.model

    def _drain(self) -> None:
        while self._inbox:
            kind, item = self._inbox.popleft()
            if kind == "abort":
                if self.scheduler.abort(item) is not None:
                    self.engine.release(item)
                self._live.pop(item, None)
                self._ctx.pop(item, None)
                continue
            req: ServeRequest = item
            if req.request_id in self._live:
                continue  # re-delivered while still in flight
            if req.adapter and req.adapter != BASE_ADAPTER and (
                    req.adapter not in self.engine.adapters or not self.engine.adapter_servable(req.adapter)):
                # Personalisation is best effort: serve the base model and say so in the final
                # (adapter_version ""), rather than fail the request. An adapter pinned to another
                # base version than the one loaded is never served (version pinning).
                req = dataclasses.replace(req, adapter=None)
            ids = req.prompt_ids or tuple(self.engine.encode_prompt(req.prompt))
            arrival = req.arrival_s if req.arrival_s is not None else self.clock()
            prediction = self.predictor.predict(req.prompt)
            predicted = prediction.tokens
            length = prediction.distribution
            if self.config.clamp_prediction_to_max_tokens:
                predicted = min(predicted, float(req.sampling.max_tokens))
                length = length.capped(req.sampling.max_tokens) if length is not None else None
            self._live[req.request_id] = _Live(req, ids, arrival, predicted)
            self.scheduler.add(SchedRequest(
                request_id=req.request_id, arrival_s=arrival, prompt_tokens=len(ids),
                predicted_tokens=max(predicted, 1.0), max_tokens=req.sampling.max_tokens,
                deadline_s=arrival + req.slo_s if req.slo_s is not None else math.inf,
                slo_class=req.slo_class, length=length, reroutable=req.reroutable,
            ))

    def _finish(self, sreq: SchedRequest, now: float) -> FinalEvent:
        rid = sreq.request_id
        self.engine.release(rid)
        self._ctx.pop(rid, None)
        live = self._live.pop(rid)
        self._lengths.append(sreq.generated)
        if self.config.learn_online and not live.note:  # a shortened answer's length is not its natural one
            self.predictor.observe(live.req.prompt, sreq.generated)
        admitted = live.admitted_s if live.admitted_s is not None else now
        first = live.first_token_s if live.first_token_s is not None else now
        return FinalEvent(
            request_id=rid, text="".join(live.parts), prompt_tokens=len(live.prompt_ids),
            output_tokens=sreq.generated, queue_s=admitted - live.arrival_s,
            first_token_s=first - live.arrival_s, total_s=now - live.arrival_s,
            finish_reason=live.reason, adapter_version=live.req.adapter or "",
            model_version=live.model_version, predicted_tokens=live.predicted,
            slo_met=None if live.req.slo_s is None else now - live.arrival_s <= live.req.slo_s,
            prompt_token_ids=live.prompt_ids, output_token_ids=tuple(live.token_ids),
            output_logprobs=tuple(live.logprobs) if len(live.logprobs) == len(live.token_ids) else (),
            note=live.note, preemptions=sreq.preemptions,
        )

    # --- weights (between iterations) -------------------------------------------------------------
    def load_adapter(self, adapter_hash: str, path: str) -> None:
        with self._lock:
            self.engine.load_adapter(adapter_hash, path)

    def unload_adapter(self, adapter_hash: str) -> None:
        with self._lock:
            self.engine.unload_adapter(adapter_hash)

    def load_checkpoint(self, version: str, path: str) -> None:
        with self._lock:
            self.engine.load_checkpoint(version, path)

    # --- observability ------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Figures for the worker heartbeat."""
        now = self.clock()
        while self._rate and self._rate[0][0] < now - self.config.rate_window_s:
            self._rate.popleft()
        span = min(self.config.rate_window_s, max(now - self._rate[0][0], 1e-9)) if self._rate else 1.0
        sched = self.scheduler
        return {
            "queue_length": self.queue_length,
            "running": self.running,
            "tokens_per_s": sum(n for _, n in self._rate) / span if self._rate else 0.0,
            "memory_rss_bytes": rss_bytes(),
            "loaded_adapters": list(self.engine.adapters),
            "model_version": self.engine.model_version,
            "policy": self.config.policy,
            "predictor_accuracy": self.predictor.recent_accuracy,
            "step_cost": sched.cost,
            "cost_samples": self.calibration.samples if self.calibration is not None else 0,
            "max_batch": sched.config.max_batch,
            "backlog_s": sched.backlog_s(now),
            "mean_output_tokens": sum(self._lengths) / len(self._lengths) if self._lengths else 0.0,
            "kv_blocks_total": sched.config.kv.total_blocks,
            "kv_blocks_used": sched.ledger.used,
            "preemptions": sched.preemptions,
            "verdicts": dict(self.verdicts),
            "device": self.engine.device_name,
        }


def rss_bytes() -> int:
    """Resident set size of this process (Linux /proc; peak RSS elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
