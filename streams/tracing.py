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
from opentelemetry.propagate import extract, inject
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.trace import Span, SpanKind

Headers = Sequence[tuple[str, bytes | None]]
_TRACER_NAME = "flywheel"
_TRACE_HEADERS = ("traceparent", "tracestate")


def setup_tracing(service_name: str, otlp_endpoint: str | None = None,
                  exporter: SpanExporter | None = None) -> TracerProvider:
    """Install a tracer provider for this process; export over OTLP/HTTP when configured."""
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
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
    return trace.get_tracer(_TRACER_NAME)


def inject_headers(headers: list[tuple[str, bytes]] | None = None,
                   ctx: otel_context.Context | None = None) -> list[tuple[str, bytes]]:
    """Return ``headers`` plus the W3C trace context of ``ctx`` (default: the current one)."""
    carrier: dict[str, str] = {}
    inject(carrier, context=ctx)
    out = [(k, v) for k, v in (headers or []) if k not in _TRACE_HEADERS]
    out += [(k, v.encode()) for k, v in carrier.items()]
    return out


def extract_context(headers: Headers | None) -> otel_context.Context:
    """The trace context carried by a record's headers (an empty context if none)."""
    carrier: dict[str, str] = {}
    for key, value in headers or ():
        if key in _TRACE_HEADERS and value is not None:
            try:
                carrier[key] = value.decode("ascii")
            except UnicodeDecodeError:
                continue  # a malformed header never breaks processing; the span starts a new trace
    return extract(carrier)


def trace_id_of(headers: Headers | None) -> str | None:
    """The 32-hex trace id in a record's traceparent, if any (for tests and logs)."""
    span_ctx = trace.get_current_span(extract_context(headers)).get_span_context()
    return format(span_ctx.trace_id, "032x") if span_ctx.is_valid else None


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
