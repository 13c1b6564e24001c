"""FlywheelClient: publish requests and feedback, await responses by correlation id.

    async with FlywheelClient.connect(settings) as client:
        response = await client.submit(user_id="u1", prompt="What is 2+3?", max_tokens=32)
        async for delta in client.stream(user_id="u1", prompt="Tell me a story"):
            print(delta, end="")
        await client.feedback(user_id="u1", request_id=response["request_id"], kind="thumbs",
                              thumbs_up=True)

The client reads the response and chunk topics from their end (no consumer group: every client
sees every partition) and hands each record to the waiter with the same request id. It only
hands a response to the user who sent the request: a record whose user id differs is ignored.
Each request starts a trace; the request's feedback continues the same trace.

Feedback names only a request id (bare, or ``chatcmpl-<id>`` as the OpenAI API shows it); the
client fills in what the learners need from what was served: the model (and for a pairwise
preference each side's model), the model version and the adapter version. It remembers what it
delivered; older responses are looked up in the workers' ledger (``final_responses``). The
gateway's ``/v1/feedback`` goes through the same method, so feedback from HTTP and from Python
carry the same fields. Feedback about a response nobody knows is still published as given: the
learners that cannot use it dead-letter it with the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from opentelemetry import trace
from opentelemetry.trace import SpanContext, SpanKind

from core.errors import RetriableError
from infra.connect import Services, connect
from infra.settings import Settings
from streams import events
from streams.kafka import EventConsumer, EventProducer
from streams.tracing import tracer

log = logging.getLogger(__name__)
OPENAI_ID_PREFIX = "chatcmpl-"


def bare_request_id(request_id: str) -> str:
    """The request id behind an OpenAI completion id (``chatcmpl-<id>``); other ids unchanged."""
    return request_id[len(OPENAI_ID_PREFIX):] if request_id.startswith(OPENAI_ID_PREFIX) else request_id


@dataclass(frozen=True)
class Served:
    """What answered a request: the facts feedback about it needs."""

    user_id: str
    model: str
    model_version: str | None
    adapter_version: str | None

    @classmethod
    def of(cls, response: dict[str, Any]) -> Served:
        return cls(str(response["user_id"]), str(response["model"]), response.get("model_version"),
                   response.get("adapter_version"))


class ResponseTimeout(RetriableError):
    """No final response arrived in time (the request may still complete later)."""


@dataclass
class _Pending:
    user_id: str
    final: asyncio.Future[dict[str, Any]]
    chunks: asyncio.Queue[dict[str, Any]] | None = None
    seen_chunks: set[int] = field(default_factory=set)


class FlywheelClient:
    def __init__(self, services: Services, owns_services: bool = False, trace_memory: int = 10_000,
                 served_memory: int = 100_000) -> None:
        self.services = services
        self._owns = owns_services
        self.producer = EventProducer(services.kafka, services.serde, services.capabilities)
        self.consumer = EventConsumer(services.kafka, services.serde,
                                      [services.catalog.responses, services.catalog.chunks],
                                      group_id=None, auto_offset_reset="latest")
        self._pending: dict[str, _Pending] = {}
        self._traces: OrderedDict[str, SpanContext] = OrderedDict()
        self._trace_memory = trace_memory
        self._served: OrderedDict[str, Served] = OrderedDict()
        self._served_memory = served_memory
        self._reader: asyncio.Task[None] | None = None

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(cls, settings: Settings) -> AsyncIterator[FlywheelClient]:
        services = await connect(settings, "flywheel-client")
        client = cls(services, owns_services=True)
        await client.start()
        try:
            yield client
        finally:
            await client.close()

    async def start(self) -> None:
        await self.producer.start()
        await self.consumer.start()
        # Position at the end before any request is sent, so no response can be missed.
        await self.consumer.raw.seek_to_end()
        for tp in self.consumer.raw.assignment():
            await self.consumer.raw.position(tp)
        self._reader = asyncio.create_task(self._read(), name="flywheel-client-reader")

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        await self.consumer.stop()
        await self.producer.stop()
        if self._owns:
            await self.services.close()

    async def _read(self) -> None:
        responses = self.services.catalog.responses
        async for batch in self.consumer.batches(timeout_ms=100):
            for item in batch:
                if item.event is None:
                    continue  # not ours to dead-letter: the client is a reader, not a stage
                pending = self._pending.get(item.event.get("request_id", ""))
                if pending is None or item.event["user_id"] != pending.user_id:
                    continue
                if item.record.topic == responses:
                    if not pending.final.done():
                        self.remember_served(item.event)
                        pending.final.set_result(item.event)
                elif pending.chunks is not None and item.event["index"] not in pending.seen_chunks:
                    pending.seen_chunks.add(item.event["index"])
                    pending.chunks.put_nowait(item.event)

    def _remember_trace(self, request_id: str, span_context: SpanContext) -> None:
        self._traces[request_id] = span_context
        while len(self._traces) > self._trace_memory:
            self._traces.popitem(last=False)

    async def publish_request(self, request: dict[str, Any], chunks: bool = False) -> _Pending:
        """Publish an InferenceRequest (built with ``streams.events.inference_request``)."""
        rid = request["request_id"]
        pending = _Pending(request["user_id"], asyncio.get_running_loop().create_future(),
                           asyncio.Queue() if chunks else None)
        self._pending[rid] = pending
        with tracer().start_as_current_span("flywheel.request", kind=SpanKind.PRODUCER,
                                            attributes={"flywheel.request_id": rid,
                                                        "enduser.id": request["user_id"]}) as span:
            self._remember_trace(rid, span.get_span_context())
            await self.producer.send_and_wait(self.services.catalog.requests, request, key=request["user_id"])
        return pending

    async def submit(self, *, timeout_s: float = 120.0, **request_fields: Any) -> dict[str, Any]:
        """Publish a request and wait for its final InferenceResponse."""
        request = events.inference_request(**request_fields)
        pending = await self.publish_request(request)
        try:
            return await asyncio.wait_for(pending.final, timeout_s)
        except TimeoutError as exc:
            raise ResponseTimeout(f"no response to {request['request_id']} within {timeout_s}s") from exc
        finally:
            self._pending.pop(request["request_id"], None)

    async def stream_events(self, *, timeout_s: float = 120.0, request: dict[str, Any] | None = None,
                            **request_fields: Any) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """Publish a streaming request; yield ``("chunk", ResponseChunk)`` in index order, then
        ``("final", InferenceResponse)``. Chunks and the final record travel on different topics,
        so the final can overtake the last chunks: the final text is authoritative, and the
        caller gets a last synthetic chunk with whatever the chunks had not delivered."""
        request = request or events.inference_request(stream=True, **request_fields)
        pending = await self.publish_request(request, chunks=True)
        assert pending.chunks is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        next_index = 0
        buffered: dict[int, dict[str, Any]] = {}
        streamed: list[str] = []
        try:
            while not (pending.final.done() and pending.chunks.empty()):
                try:
                    chunk = await asyncio.wait_for(pending.chunks.get(), timeout=0.05)
                except TimeoutError:
                    if loop.time() > deadline:
                        raise ResponseTimeout(f"no response to {request['request_id']}") from None
                    continue
                buffered[chunk["index"]] = chunk
                while next_index in buffered:
                    streamed.append(buffered[next_index]["delta"])
                    yield "chunk", buffered.pop(next_index)
                    next_index += 1
            final = pending.final.result()
            so_far = "".join(streamed)
            if final["text"].startswith(so_far) and len(final["text"]) > len(so_far):
                yield "chunk", {"request_id": final["request_id"], "index": next_index,
                                "delta": final["text"][len(so_far):], "model": final["model"]}
            yield "final", final
        finally:
            self._pending.pop(request["request_id"], None)

    async def stream(self, *, timeout_s: float = 120.0, **request_fields: Any) -> AsyncIterator[str]:
        """Publish a streaming request and yield its text deltas in order."""
        async for kind, event in self.stream_events(timeout_s=timeout_s, **request_fields):
            if kind == "chunk":
                yield event["delta"]

    def trace_of(self, request_id: str) -> SpanContext | None:
        return self._traces.get(request_id)

    def remember_served(self, response: dict[str, Any]) -> None:
        """Keep what answered a request (bounded; the ledger answers for older ones)."""
        if response.get("error") or not response.get("model"):
            return  # an error answer was not produced by a model: nothing to rate
        self._served[response["request_id"]] = Served.of(response)
        self._served.move_to_end(response["request_id"])
        while len(self._served) > self._served_memory:
            self._served.popitem(last=False)

    async def served(self, request_ids: list[str]) -> dict[str, Served]:
        """What answered each request, from memory or else the workers' ledger (unknown ids absent)."""
        found = {rid: self._served[rid] for rid in request_ids if rid in self._served}
        missing = [rid for rid in request_ids if rid not in found]
        if missing:
            try:
                rows = await self.services.pool.fetch(
                    "SELECT request_id, user_id, model, response->>'model_version' AS model_version, "
                    "response->>'adapter_version' AS adapter_version FROM final_responses "
                    "WHERE request_id = ANY($1::text[])", missing)
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
                # Feedback is still published as given (the learners dead-letter what they cannot
                # use): a ledger outage must not lose the user's feedback.
                log.warning("ledger lookup for %s failed (%s); feedback goes out as given", missing, exc)
                return found
            found |= {r["request_id"]: Served(r["user_id"], r["model"], r["model_version"], r["adapter_version"])
                      for r in rows}
        return found

    async def complete_feedback(self, fields: dict[str, Any]) -> dict[str, Any]:
        """``fields`` with bare request ids and what was served filled in (served facts win over
        what the caller claims; a field nobody knows is left as given)."""
        out = dict(fields)
        out["request_id"] = bare_request_id(str(out["request_id"]))
        pair = dict(out["pairwise"]) if out.get("pairwise") else None
        ids = [out["request_id"]]
        if pair is not None:
            for side in ("a", "b"):
                if f"request_id_{side}" in pair:
                    pair[f"request_id_{side}"] = bare_request_id(str(pair[f"request_id_{side}"]))
                    ids.append(pair[f"request_id_{side}"])
        served = await self.served(ids)
        about = served.get(out["request_id"])
        if about is not None:
            out |= {"model": about.model, "model_version": about.model_version,
                    "adapter_version": about.adapter_version}
        if pair is not None:
            for side in ("a", "b"):
                side_served = served.get(str(pair.get(f"request_id_{side}")))
                if side_served is not None:
                    pair[f"model_{side}"] = side_served.model
            out["pairwise"] = pair
        return out

    async def feedback(self, **feedback_fields: Any) -> dict[str, Any]:
        """Publish Feedback (``streams.events.feedback`` fields), completed by
        :meth:`complete_feedback`; it joins the request's trace."""
        fields = await self.complete_feedback(feedback_fields)
        pair = fields.get("pairwise") or {}
        unknown = [pair.get(f"request_id_{side}") for side in ("a", "b") if pair and not pair.get(f"model_{side}")]
        if unknown:
            raise ValueError(f"pairwise feedback: no response to {unknown} was delivered, so the models to "
                             "compare are unknown (name them as model_a / model_b, or retry once answered)")
        record = events.feedback(**fields)
        parent = self._traces.get(record["request_id"])
        ctx = trace.set_span_in_context(trace.NonRecordingSpan(parent)) if parent else None
        with tracer().start_as_current_span("flywheel.feedback", context=ctx, kind=SpanKind.PRODUCER,
                                            attributes={"flywheel.request_id": record["request_id"]}):
            await self.producer.send_and_wait(self.services.catalog.feedback, record, key=record["user_id"])
        return record
