"""OpenTelemetry tracing across Kafka hops with W3C trace context in record headers.

A producer injects ``traceparent`` (and ``tracestate``) into each record's headers; a consumer
extracts it and starts its processing span as a child, so request -> routing -> inference ->
response -> feedback form ONE trace. Span names and attributes follow the OTel messaging
semantic conventions (``send <topic>`` PRODUCER, ``process <topic>`` CONSUMER,
``messaging.system=kafka``, partition, offset, consumer group).

Without ``setup_tracing`` the global no-op provider is used and all of this costs ~nothing.

The per-record path is kept near its floor, because every stage runs it for every record:

* an UNSAMPLED record builds no OpenTelemetry objects at all: ``process_context`` only makes its
  raw ``traceparent`` current (a context variable), and ``inject_headers`` forwards it unchanged,
  so outputs stay in the same (unsampled) trace. ``current_context()`` builds the OTel context on
  demand for the rare handler that starts a span of its own.
* a SAMPLED record gets a real CONSUMER span, built directly as the SDK's ``ReadableSpan`` and
  handed to the provider's span processors when it ends (what the SDK's ``Span.end`` does),
  skipping the SDK's general start-span machinery (sampler call, attribute locks, context
  managers) that costs several times more. Trace id, parent, kind, name, attributes, timing and
  resource are exactly what the SDK would record (``tests/unit/streams/test_tracing.py``).
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import NonRecordingSpan, Span, SpanContext, SpanKind, TraceFlags, TraceState

Headers = Sequence[tuple[str, bytes | None]]
_TRACER_NAME = "flywheel"
_TRACE_HEADERS = ("traceparent", "tracestate")
# The raw trace headers of the unsampled record being processed (None outside one).
_CARRIED: ContextVar[tuple[bytes, bytes | None] | None] = ContextVar("flywheel_carried_trace", default=None)
_RANDOM = random.Random()


class _SpanSink:
    """Where lean consumer spans go: the provider's processors, resource and our scope."""

    def __init__(self, provider: TracerProvider) -> None:
        # The provider's own multi-processor: every processor added later is included.
        self.processor: SpanProcessor = provider._active_span_processor
        self.resource = provider.resource
        self.scope = InstrumentationScope(_TRACER_NAME)


_SINK: _SpanSink | None = None


def setup_tracing(service_name: str, otlp_endpoint: str | None = None,
                  exporter: SpanExporter | None = None, sample_ratio: float = 1.0) -> TracerProvider:
    """Install a tracer provider for this process; export over OTLP/HTTP when configured.

    Sampling is decided once, at the root of a trace (``sample_ratio`` of new traces), and every
    later hop follows the decision carried in ``traceparent`` (parent-based sampling), so a
    trace is either complete or absent.
    """
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}),
                              sampler=ParentBased(TraceIdRatioBased(sample_ratio)))
    if otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        endpoint = otlp_endpoint.rstrip("/")
        if not endpoint.endswith("/v1/traces"):
            endpoint += "/v1/traces"
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    global _SINK
    # set_tracer_provider keeps the first provider of a process; lean spans go where the SDK's do.
    installed = trace.get_tracer_provider()
    _SINK = _SpanSink(installed) if isinstance(installed, TracerProvider) else None
    return provider


def tracer() -> trace.Tracer:
    """The project's tracer (resolved through the global provider, so a provider installed after
    import is honoured; the proxy tracer caches the real one once it exists)."""
    return _TRACER


_TRACER = trace.get_tracer(_TRACER_NAME)


def inject_headers(headers: list[tuple[str, bytes]] | None = None,
                   ctx: otel_context.Context | None = None) -> list[tuple[str, bytes]]:
    """Return ``headers`` plus the W3C trace context of ``ctx`` (default: the current one).

    This is on every record's hot path, so the ``traceparent`` is formatted directly from the
    span context (the W3C format is fixed: version-traceid-spanid-flags) instead of going
    through the generic propagator stack; ``tracestate`` is carried when present. Baggage is
    not propagated through Kafka.
    """
    out = [(k, v) for k, v in headers if k not in _TRACE_HEADERS] if headers else []
    carried = _CARRIED.get() if ctx is None else None
    if carried is not None:  # inside an unsampled record: forward its trace headers as they are
        out.append(("traceparent", carried[0]))
        if carried[1]:
            out.append(("tracestate", carried[1]))
        return out
    span_ctx = trace.get_current_span(ctx).get_span_context()
    if span_ctx.is_valid:
        out.append(("traceparent", b"00-%032x-%016x-%02x" % (span_ctx.trace_id, span_ctx.span_id,
                                                            span_ctx.trace_flags)))
        if span_ctx.trace_state:
            out.append(("tracestate", span_ctx.trace_state.to_header().encode()))
    return out


def extract_context(headers: Headers | None) -> otel_context.Context:
    """The trace context carried by a record's headers (an empty context if none).

    Parses ``traceparent`` directly (hot path, see ``inject_headers``); anything malformed is
    ignored, so a bad header never breaks processing: the record simply starts a new trace.
    """
    parent: bytes | None = None
    state: bytes | None = None
    for key, value in headers or ():
        if key == "traceparent":
            parent = value
        elif key == "tracestate":
            state = value
    if parent is None or len(parent) != 55 or parent[:3] != b"00-":
        return otel_context.Context()
    try:
        trace_id = int(parent[3:35], 16)
        span_id = int(parent[36:52], 16)
        flags = int(parent[53:55], 16)
        trace_state = TraceState.from_header([state.decode("ascii")]) if state else None
    except (ValueError, UnicodeDecodeError):
        return otel_context.Context()
    if trace_id == 0 or span_id == 0:
        return otel_context.Context()
    span_ctx = SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(flags),
                           trace_state=trace_state)
    return trace.set_span_in_context(NonRecordingSpan(span_ctx))


def trace_id_of(headers: Headers | None) -> str | None:
    """The 32-hex trace id in a record's traceparent, if any (for tests and logs)."""
    span_ctx = trace.get_current_span(extract_context(headers)).get_span_context()
    return format(span_ctx.trace_id, "032x") if span_ctx.is_valid else None


def is_sampled(headers: Headers | None) -> bool:
    """Whether a record's traceparent says its trace is sampled (cheap: no context objects).

    traceparent = version "-" trace-id "-" parent-id "-" flags; bit 0 of flags is "sampled".
    """
    for key, value in headers or ():
        if key == "traceparent" and value is not None and len(value) >= 55:
            try:
                return bool(int(value[53:55], 16) & 1)
            except ValueError:
                return False
    return False


def current_context() -> otel_context.Context:
    """The OpenTelemetry context of the record being processed, for a handler that starts a span
    of its own (``tracer().start_as_current_span(name, context=current_context())``): inside an
    unsampled record it is built here, on demand, so the span joins (and skips) that trace."""
    carried = _CARRIED.get()
    if carried is None:
        return otel_context.get_current()
    return extract_context([("traceparent", carried[0]), ("tracestate", carried[1])])


def _trace_headers(headers: Headers | None) -> tuple[bytes | None, bytes | None]:
    parent: bytes | None = None
    state: bytes | None = None
    for key, value in headers or ():
        if key == "traceparent":
            parent = value
        elif key == "tracestate":
            state = value
    return parent, state


@contextmanager
def process_context(topic: str, headers: Headers | None, partition: int | None = None,
                    offset: int | None = None, group: str | None = None,
                    attributes: dict[str, Any] | None = None) -> Iterator[Span | None]:
    """Process one record inside its trace.

    Sampled trace: a CONSUMER span, child of the record's producer context (yielded as a
    non-recording handle whose context is current, so outputs and child spans join it).
    Unsampled: no span and no OTel objects: the raw traceparent is made current so anything
    produced continues the same trace id. No trace context at all: a new trace starts only if
    spans are being recorded (the sampler decides, as for any root)."""
    parent, state = _trace_headers(headers)
    flags = -1  # no usable traceparent
    if parent is not None and len(parent) == 55 and parent[:3] == b"00-":
        try:
            flags = int(parent[53:55], 16)
        except ValueError:
            flags = -1
    if flags >= 0 and not flags & 1:
        assert parent is not None
        token = _CARRIED.set((parent, state))
        try:
            yield None
        finally:
            _CARRIED.reset(token)
        return
    sink = _SINK
    if flags < 0 or sink is None:  # a root (no or malformed traceparent), or no SDK: the SDK path
        carried = _CARRIED.set(None)
        try:
            with consumer_span(topic, headers, partition, offset, group, attributes) as span:
                yield span
        finally:
            _CARRIED.reset(carried)
        return
    assert parent is not None
    try:
        trace_id = int(parent[3:35], 16)
        parent_span_id = int(parent[36:52], 16)
        trace_state = TraceState.from_header([state.decode("ascii")]) if state else None
    except (ValueError, UnicodeDecodeError):
        trace_id = 0
    if trace_id == 0 or parent_span_id == 0:  # malformed: a fresh root, as the propagator would do
        with consumer_span(topic, None, partition, offset, group, attributes) as span:
            yield span
        return
    sampled = TraceFlags(flags)
    parent_ctx = SpanContext(trace_id, parent_span_id, is_remote=True, trace_flags=sampled, trace_state=trace_state)
    span_ctx = SpanContext(trace_id, _RANDOM.getrandbits(64) or 1, is_remote=False, trace_flags=sampled,
                           trace_state=trace_state)
    handle = NonRecordingSpan(span_ctx)
    attrs: dict[str, Any] = {"messaging.system": "kafka", "messaging.destination.name": topic,
                             "messaging.operation.type": "process"}
    if partition is not None:
        attrs["messaging.destination.partition.id"] = str(partition)
    if offset is not None:
        attrs["messaging.kafka.offset"] = offset
    if group:
        attrs["messaging.consumer.group.name"] = group
    if attributes:
        attrs.update(attributes)
    carried = _CARRIED.set(None)
    attached = otel_context.attach(trace.set_span_in_context(handle, otel_context.Context()))
    start = time.time_ns()
    try:
        yield handle
    finally:
        end = time.time_ns()
        otel_context.detach(attached)
        _CARRIED.reset(carried)
        sink.processor.on_end(ReadableSpan(
            f"process {topic}", span_ctx, parent_ctx, sink.resource, attrs, kind=SpanKind.CONSUMER,
            start_time=start, end_time=end, instrumentation_scope=sink.scope))


@contextmanager
def producer_span(topic: str, attributes: dict[str, Any] | None = None) -> Iterator[Span]:
    with tracer().start_as_current_span(
        f"send {topic}", kind=SpanKind.PRODUCER,
        attributes={"messaging.system": "kafka", "messaging.destination.name": topic,
                    "messaging.operation.type": "send", **(attributes or {})},
    ) as span:
        yield span


@contextmanager
def consumer_span(topic: str, headers: Headers | None, partition: int | None = None,
                  offset: int | None = None, group: str | None = None,
                  attributes: dict[str, Any] | None = None) -> Iterator[Span]:
    """A ``process <topic>`` span, child of the producer's context carried in ``headers``."""
    attrs: dict[str, Any] = {"messaging.system": "kafka", "messaging.destination.name": topic,
                             "messaging.operation.type": "process"}
    if partition is not None:
        attrs["messaging.destination.partition.id"] = str(partition)
    if offset is not None:
        attrs["messaging.kafka.offset"] = offset
    if group:
        attrs["messaging.consumer.group.name"] = group
    attrs.update(attributes or {})
    with tracer().start_as_current_span(
        f"process {topic}", context=extract_context(headers), kind=SpanKind.CONSUMER, attributes=attrs
    ) as span:
        yield span
