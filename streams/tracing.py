"""OpenTelemetry tracing across Kafka hops with W3C trace context in record headers.

A producer injects ``traceparent`` (and ``tracestate``) into each record's headers; a consumer
extracts it and starts its processing span as a child, so request -> routing -> inference ->
response -> feedback form ONE trace. Span names and attributes follow the OTel messaging
semantic conventions (``send <topic>`` PRODUCER, ``process <topic>`` CONSUMER,
``messaging.system=kafka``, partition, offset, consumer group).

Without ``setup_tracing`` the global no-op provider is used and all of this costs ~nothing.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import NonRecordingSpan, Span, SpanContext, SpanKind, TraceFlags, TraceState

Headers = Sequence[tuple[str, bytes | None]]
_TRACER_NAME = "flywheel"
_TRACE_HEADERS = ("traceparent", "tracestate")


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


@contextmanager
def process_context(topic: str, headers: Headers | None, partition: int | None = None,
                    offset: int | None = None, group: str | None = None,
                    attributes: dict[str, Any] | None = None) -> Iterator[Span | None]:
    """Process one record inside its trace: a CONSUMER span when the trace is sampled; otherwise
    only the carried context is made current (so anything produced continues the same trace
    id) without paying for a span that would be dropped."""
    if is_sampled(headers):
        with consumer_span(topic, headers, partition, offset, group, attributes) as span:
            yield span
        return
    token = otel_context.attach(extract_context(headers))
    try:
        yield None
    finally:
        otel_context.detach(token)


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
