"""The inference worker: RoutingDecisions for one model in, responses out.

Threads: the ``ServingLoop`` (scheduler + engine) runs in its own thread, one ``step()`` after
another; Kafka I/O runs on the asyncio loop. Steps hand their events to the loop through a queue.

Delivery. An offset is committed only once every decision before it on its partition is
answered (or dead-lettered, or skipped as already answered). On Apache Kafka the final responses
(and sampled rollouts) of a step are produced in ONE transaction with those offsets, so a crash
never leaves a committed final without its offset or the reverse. Streamed chunks are produced
outside the transaction (they must flow while generating); a regenerated request repeats chunk
indexes, which readers deduplicate. A request id found in the ``final_responses`` ledger is never
generated again. On a rebalance the worker aborts the work of revoked partitions and finishes any
transaction in flight before giving them up, so the new owner starts exactly after the last
committed answer.

Admission control. A request the scheduler cannot serve by its deadline is answered at once
with ``finish_reason: deadline`` and the reason in ``admission`` (nothing is generated), or, when
the routing decision named a cheaper live model, its decision is forwarded to that model's
topic (in the same transaction as the offset past it, so it is neither lost nor doubled) and the
cheaper model's final carries the reason. A request is rerouted at most once. A request served
with fewer max tokens says so in ``admission`` too.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from aiokafka import TopicPartition

from core.catalog import get_model
from core.errors import DeadLetterError, ValidationError
from core.slo import deadline_ms
from core.validation import RequestLimits, validate_request
from infra.connect import Services
from infra.telemetry import QUEUE_LENGTH, REQUEST_LATENCY, RESPONSES, RUNNING, SLO, TOKENS
from models.prompting import prompt_ids as prompt_ids_for
from streams.dlq import DeadLetters
from streams.events import envelope, event_time_ms, prompt_text
from streams.kafka import EventConsumer, EventProducer, Received, fetch_committed
from streams.stage_loop import Output, StageConfig, StageLoop
from workers.engines.base import SamplingParams
from workers.reroute import REROUTE_REASON, reroute_target, rerouted_decision
from workers.serving import ChunkEvent, FinalEvent, ServeRequest, ServingLoop

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerConfig:
    model: str
    worker_id: str
    max_inflight: int = 32
    """Decisions admitted but not answered before the worker stops fetching (Kafka holds the rest)."""
    rollout_sample: float = 0.25
    """Share of served responses also published as Rollouts for the trainer."""
    heartbeat_interval_s: float = 2.0
    max_adapters: int = 16
    """LoRA adapters kept loaded (least recently used are unloaded)."""
    reroute: bool = True
    """Hand requests that cannot meet their SLO here to a cheaper live model from the decision."""


@dataclass
class _InFlight:
    origin: Received
    """The consumed decision (its partition, offset and trace headers)."""
    decision: dict[str, Any]
    started: float = field(default_factory=time.monotonic)

    @property
    def tp(self) -> TopicPartition:
        return self.origin.tp

    @property
    def offset(self) -> int:
        return self.origin.record.offset


class InferenceWorker:
    def __init__(self, services: Services, serving: ServingLoop, config: WorkerConfig) -> None:
        self.s = services
        self.serving = serving
        self.config = config
        self.spec = get_model(config.model)
        self.catalog = services.catalog
        self.group = f"{services.settings.topic_prefix}flywheel-worker-{config.model}"
        self.limits = RequestLimits(services.settings.max_prompt_chars, services.settings.max_tokens_limit)
        # Subscribed in run(), with a rebalance listener.
        self.consumer = EventConsumer(services.kafka, services.serde, [], group_id=self.group,
                                      capabilities=services.capabilities, max_poll_interval_ms=600_000)
        self.chunks = EventProducer(services.kafka, services.serde, services.capabilities, linger_ms=2)
        self.finals = EventProducer(services.kafka, services.serde, services.capabilities,
                                    transactional_id=f"{self.group}-{config.worker_id}")
        # Dead letters go through the non-transactional producer and are acknowledged before the
        # offset past them is committed.
        self.dlq = DeadLetters(self.chunks, self.catalog.dlq("worker"), "worker")
        # The shared loop: decisions are held until answered; finals, rollouts and forwarded
        # decisions go out with the offsets they finish (one transaction on Apache Kafka).
        self.stage = StageLoop(self.consumer, self.finals, self.dlq, self.group,
                               StageConfig("worker", batch_timeout_ms=100, max_records=16),
                               committed=lambda tps: fetch_committed(services.kafka, self.group, tps))
        self.inflight: dict[str, _InFlight] = {}
        self._decisions: dict[str, dict[str, Any]] = {}  # decisions being admitted (before inflight)
        self.rerouted = 0
        self.user_adapters: dict[str, tuple[str, str]] = {}  # user -> (hash, uri), newest announced
        self.loaded: OrderedDict[str, None] = OrderedDict()
        self.events: asyncio.Queue[list[Any]] = asyncio.Queue()
        self.stop = asyncio.Event()
        self._wake = threading.Event()
        self._beat_now = asyncio.Event()
        self._rng = random.Random(config.worker_id)

    # -- engine thread -------------------------------------------------------------------------
    def _engine_thread(self, loop: asyncio.AbstractEventLoop) -> None:
        while not self.stop.is_set():
            if not self.serving.has_work():
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            events = self.serving.step()
            if events:
                loop.call_soon_threadsafe(self.events.put_nowait, events)

    # -- consuming decisions -------------------------------------------------------------------
    async def _answered(self, request_ids: list[str]) -> set[str]:
        rows = await self.s.pool.fetch("SELECT request_id FROM final_responses WHERE request_id = ANY($1::text[])",
                                       request_ids)
        return {r["request_id"] for r in rows}

    async def _admit_batch(self, batch: list[Received]) -> list[Output]:
        """The stage's handler: fresh decisions are admitted to the serving loop and held until
        answered; one answered before (the ledger) or already in flight is finished at once; one
        that fails validation is dead-lettered. Outputs come later, from ``_publish``."""
        done = await self._answered([i.event["request"]["request_id"] for i in batch if i.event])
        for item in batch:
            decision = item.event
            assert decision is not None  # the loop dead-letters undecodable records
            request = decision["request"]
            rid = request["request_id"]
            if rid in done or rid in self.inflight:
                continue  # answered before, or re-delivered now
            try:
                validate_request(request, self.limits)
                self._decisions[rid] = decision
                serve = await self._serve_request(request)
            except DeadLetterError as exc:
                await self.stage.dead_letter(item, exc, decision)
                continue
            finally:
                self._decisions.pop(rid, None)
            if item.tp not in self.consumer.assignment():
                continue  # revoked while it was being prepared: its new owner serves it
            self.stage.hold(item)
            if not self.inflight:
                self._beat_now.set()  # idle -> busy: tell background learners now, not at the next beat
            self.inflight[rid] = _InFlight(item, decision)
            self.serving.admit(serve)
        self._wake.set()
        return []

    async def _serve_request(self, request: dict[str, Any]) -> ServeRequest:
        engine: Any = self.serving.engine
        messages = request.get("messages") or [{"role": "user", "content": request["prompt"]}]
        try:  # the model's own prompt format: its chat template, or plain completion text
            prompt_ids, format_stops = prompt_ids_for(self.spec, engine.tokenizer, messages)
        except Exception as exc:  # a template that rejects this conversation (e.g. role order)
            raise ValidationError(f"the {self.config.model} prompt format rejects these messages: {exc}") from exc
        sampling = request["sampling"]
        params = SamplingParams(max_tokens=request["max_tokens"], temperature=sampling["temperature"],
                                top_p=sampling["top_p"], seed=sampling["seed"],
                                stop=tuple(sampling["stop"]) + format_stops)
        slo_s = max(0.0, (deadline_ms(request) - event_time_ms(request)) / 1000.0)
        adapter = await self._adapter_for(request["user_id"])
        reroutable = self.config.reroute and self._reroute_target(request["request_id"], request) is not None
        return ServeRequest(request_id=request["request_id"], prompt=prompt_text(request), sampling=params,
                            adapter=adapter, slo_s=slo_s, slo_class=request["slo_class"], prompt_ids=prompt_ids,
                            reroutable=reroutable)

    def _reroute_target(self, request_id: str, request: dict[str, Any]) -> str | None:
        flight = self.inflight.get(request_id)
        decision = flight.decision if flight is not None else self._decisions.get(request_id)
        return reroute_target(decision, self.config.model) if decision is not None else None

    async def _adapter_for(self, user_id: str) -> str | None:
        """The user's newest adapter, loaded on first use. Only this user's requests get it."""
        announced = self.user_adapters.get(user_id)
        if announced is None:
            return None
        adapter_hash, uri = announced
        if adapter_hash not in self.loaded:
            try:
                await asyncio.to_thread(self.serving.load_adapter, adapter_hash, uri)
            except Exception as exc:  # a missing or corrupt adapter degrades to the base model
                log.warning("cannot load adapter %s for %s: %s", adapter_hash[:12], user_id, exc)
                return None
            self.loaded[adapter_hash] = None
            while len(self.loaded) > self.config.max_adapters:
                old, _ = self.loaded.popitem(last=False)
                await asyncio.to_thread(self.serving.unload_adapter, old)
        self.loaded.move_to_end(adapter_hash)
        return adapter_hash

    async def _consume(self) -> None:
        # Backpressure: past max_inflight nothing is fetched (Kafka holds the rest).
        await self.stage.run(self._admit_batch, self.stop, ready=lambda: len(self.inflight) < self.config.max_inflight)

    # -- producing answers -----------------------------------------------------------------------
    def _response(self, final: FinalEvent, flight: _InFlight) -> dict[str, Any]:
        request = flight.decision["request"]
        notes = [n for n in (request.get("metadata", {}).get(REROUTE_REASON, ""), final.note) if n]
        if final.finish_reason in ("stop", "length"):
            reason = final.finish_reason
        else:
            reason = "deadline" if final.finish_reason == "rejected" else "error"
        return {
            **envelope(request["request_id"], request["tenant_id"], request["user_id"]),
            "request_id": request["request_id"], "model": self.config.model, "model_version": final.model_version,
            "adapter_version": final.adapter_version or None, "text": final.text,
            "prompt_tokens": final.prompt_tokens, "completion_tokens": final.output_tokens,
            "queue_ms": final.queue_s * 1000, "first_token_ms": final.first_token_s * 1000,
            "total_ms": final.total_s * 1000, "finish_reason": reason,
            "worker_id": self.config.worker_id,
            "cost_usd": self.spec.cost(final.prompt_tokens, final.output_tokens), "error": None,
            "admission": "; ".join(notes) or None,
        }

    def _rollout(self, final: FinalEvent, flight: _InFlight) -> dict[str, Any] | None:
        if final.finish_reason not in ("stop", "length") or self._rng.random() >= self.config.rollout_sample:
            return None
        request = flight.decision["request"]
        if not final.output_logprobs:
            return None  # the engine cannot report log-probs (PPO needs them)
        return {
            **envelope(request["request_id"], request["tenant_id"], request["user_id"]),
            "request_id": request["request_id"], "model": self.config.model, "model_version": final.model_version,
            "prompt": prompt_text(request), "response": final.text,
            "prompt_token_ids": list(final.prompt_token_ids), "response_token_ids": list(final.output_token_ids),
            "token_logprobs": list(final.output_logprobs), "source": "live",
            # How it was sampled and by what: the trainer's off-policy rules need both.
            "adapter_version": final.adapter_version or None,
            "temperature": float(request["sampling"]["temperature"]), "top_p": float(request["sampling"]["top_p"])}

    async def _commit(self, finals: list[tuple[FinalEvent, _InFlight]]) -> None:
        """Produce finals (and rollouts, and rerouted decisions) with the offsets they finish:
        atomically where transactions exist."""
        forwards: list[tuple[dict[str, Any], _InFlight]] = []
        answered: list[tuple[FinalEvent, _InFlight]] = []
        for final, flight in finals:
            target = reroute_target(flight.decision, self.config.model) if final.finish_reason == "rerouted" else None
            if target is not None:
                forwards.append((rerouted_decision(flight.decision, target, final.note, self.config.worker_id), flight))
            elif final.finish_reason == "rerouted":  # the cheaper model went away: answer as rejected
                answered.append((dataclasses.replace(final, finish_reason="rejected"), flight))
            else:
                answered.append((final, flight))
        responses = [(self._response(f, fl), fl) for f, fl in answered]
        rollouts = [r for final, flight in answered if (r := self._rollout(final, flight)) is not None]
        outputs = [Output(self.catalog.responses, response, response["request_id"], flight.origin)
                   for response, flight in responses]
        outputs += [Output(self.catalog.decisions(decision["model"]), decision, decision["request"]["request_id"],
                           flight.origin) for decision, flight in forwards]
        outputs += [Output(self.catalog.rollouts, rollout, rollout["request_id"]) for rollout in rollouts]
        await self.stage.commit(outputs, finished=[(fl.tp, fl.offset) for _, fl in (*responses, *forwards)])
        self.rerouted += len(forwards)
        if responses:
            await self.s.pool.executemany(
                "INSERT INTO final_responses (request_id, user_id, model, worker_id, response) VALUES "
                "($1, $2, $3, $4, $5) ON CONFLICT (request_id) DO NOTHING",
                [(resp["request_id"], resp["user_id"], self.config.model, self.config.worker_id,
                  {k: v for k, v in resp.items() if k != "event_time"}) for resp, _ in responses])

    async def _publish(self) -> None:
        while not self.stop.is_set():
            events = await self.events.get()
            finals: list[tuple[FinalEvent, _InFlight]] = []
            for event in events:
                flight = self.inflight.get(event.request_id)
                if flight is None:
                    continue  # aborted (partition revoked): its new owner answers it
                if isinstance(event, ChunkEvent):
                    request = flight.decision["request"]
                    chunk = {**envelope(event.request_id, request["tenant_id"], request["user_id"]),
                             "request_id": event.request_id, "index": event.index, "delta": event.text,
                             "model": self.config.model}
                    await self.chunks.send(self.catalog.chunks, chunk, key=event.request_id)
                else:
                    finals.append((event, flight))
            if finals:
                await self._commit(finals)
                for final, _ in finals:
                    self.inflight.pop(final.request_id, None)
                if not self.inflight:
                    self._beat_now.set()  # busy -> idle
                    RESPONSES.labels(self.config.model, final.finish_reason).inc()
                    TOKENS.labels(self.config.model).inc(final.output_tokens)
                    REQUEST_LATENCY.labels(self.config.model).observe(final.total_s)
                    if final.slo_met is not None:
                        SLO.labels(self.config.model, str(final.slo_met).lower()).inc()

    # -- rebalances, adapters, checkpoints, heartbeats ----------------------------------------------
    async def abort_revoked(self, revoked: set[TopicPartition]) -> None:
        """Give up partitions' in-flight work (the loop then forgets their uncommitted offsets)."""
        for rid, flight in list(self.inflight.items()):
            if flight.tp in revoked:
                self.serving.abort(rid)
                del self.inflight[rid]

    async def _follow_state(self) -> None:
        consumer = EventConsumer(self.s.kafka, self.s.serde, [self.catalog.adapters, self.catalog.models_topic],
                                 group_id=None, auto_offset_reset="earliest")
        await consumer.start()
        try:
            async for batch in consumer.batches(timeout_ms=500):
                for item in batch:
                    event = item.event
                    if event is None:
                        continue
                    if item.record.topic == self.catalog.adapters:
                        if not event["adapter_hash"]:  # rolled back to the base model
                            self.user_adapters.pop(event["user_id"], None)
                        elif event["base_model"] == self.config.model:
                            self.user_adapters[event["user_id"]] = (event["adapter_hash"], event["uri"])
                    elif event["model"] == self.config.model and event["version"] != self.serving.engine.model_version:
                        log.info("loading checkpoint %s (step %d)", event["version"], event["step"])
                        try:
                            await asyncio.to_thread(self.serving.load_checkpoint, event["version"], event["uri"])
                        except Exception as exc:
                            log.error("checkpoint %s failed to load: %s", event["version"], exc)
                if self.stop.is_set():
                    return
        finally:
            await consumer.stop()

    async def _heartbeat(self) -> None:
        producer = EventProducer(self.s.kafka, self.s.serde, self.s.capabilities)
        await producer.start()
        try:
            while not self.stop.is_set():
                stats = self.serving.stats()
                QUEUE_LENGTH.labels(self.config.model, self.config.worker_id).set(stats["queue_length"])
                RUNNING.labels(self.config.model, self.config.worker_id).set(stats["running"])
                await producer.send_and_wait(self.catalog.heartbeats, self._beat(stats), key=self.config.worker_id)
                self._beat_now.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._next_beat(), self.config.heartbeat_interval_s)
        finally:
            await producer.stop()

    async def _next_beat(self) -> None:
        """Returns at stop or when the worker goes from idle to busy or back."""
        waits = [asyncio.ensure_future(self.stop.wait()), asyncio.ensure_future(self._beat_now.wait())]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()

    def _beat(self, stats: dict[str, Any]) -> dict[str, Any]:
        cost = stats["step_cost"]
        held = len(self.inflight)  # admitted here and not yet answered (Kafka holds the rest)
        return {**envelope(self.config.worker_id, "system", "system"), "worker_id": self.config.worker_id,
                "model": self.config.model, "model_version": stats["model_version"], "healthy": True,
                "queue_length": max(stats["queue_length"], held - stats["running"]), "running": stats["running"],
                "tokens_per_s": float(stats["tokens_per_s"]),
                "memory_rss_mb": stats["memory_rss_bytes"] / 2**20,
                "loaded_adapters": list(stats["loaded_adapters"]), "policy": stats["policy"],
                "interval_ms": int(self.config.heartbeat_interval_s * 1000),
                "device": stats["device"],
                "step_cost": {"decode_base_s": cost.decode_base_s, "decode_per_row_s": cost.decode_per_row_s,
                              "decode_per_cell_s": cost.decode_per_cell_s, "prefill_base_s": cost.prefill_base_s,
                              "prefill_per_token_s": cost.prefill_per_token_s, "overhead_s": cost.overhead_s,
                              "samples": int(stats["cost_samples"])},
                "max_batch": int(stats["max_batch"]), "backlog_s": float(stats["backlog_s"]),
                "mean_output_tokens": float(stats["mean_output_tokens"]),
                "kv_blocks_total": int(stats["kv_blocks_total"]), "kv_blocks_used": int(stats["kv_blocks_used"]),
                "preemptions": int(stats["preemptions"]),
                "rejected": int(stats["verdicts"]["reject"]), "rerouted": int(self.rerouted),
                "shortened": int(stats["verdicts"]["shorten"])}

    async def run(self) -> None:
        await self.chunks.start()
        await self.finals.start()
        self.stage.subscribe([self.catalog.decisions(self.config.model)], on_revoked=self.abort_revoked)
        await self.consumer.start()
        loop = asyncio.get_running_loop()
        thread = threading.Thread(target=self._engine_thread, args=(loop,), name="engine", daemon=True)
        thread.start()
        tasks = [asyncio.create_task(c, name=n) for c, n in ((self._consume(), "consume"),
                                                              (self._publish(), "publish"),
                                                              (self._follow_state(), "state"),
                                                              (self._heartbeat(), "heartbeat"))]
        try:
            stopper = asyncio.create_task(self.stop.wait())
            done, _ = await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                error = None if task is stopper else task.exception()
                if error is not None:
                    raise error
        finally:
            self.stop.set()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            thread.join(10)
            await self.consumer.stop()
            await self.chunks.stop()
            await self.finals.stop()
