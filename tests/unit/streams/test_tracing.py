"""W3C trace context in Kafka headers: our fast path agrees with OpenTelemetry's propagator."""

from typing import Any

from opentelemetry import trace
from opentelemetry.propagate import extract, inject

from streams.tracing import (
    consumer_span,
    extract_context,
    inject_headers,
    is_sampled,
    process_context,
    trace_id_of,
    tracer,
)


def test_injected_traceparent_equals_the_standard_propagator():
    with tracer().start_as_current_span("root"):
        ours = dict(inject_headers(None))
        standard: dict[str, str] = {}
        inject(standard)
    assert ours["traceparent"].decode() == standard["traceparent"]


def test_extract_equals_the_standard_propagator_and_keeps_other_headers():
    with tracer().start_as_current_span("root"):
        headers = inject_headers([("x-user", b"u1"), ("traceparent", b"stale")])
    assert [k for k, _ in headers].count("traceparent") == 1
    assert ("x-user", b"u1") in headers
    ours = trace.get_current_span(extract_context(headers)).get_span_context()
    standard = trace.get_current_span(extract({"traceparent": dict(headers)["traceparent"].decode()}))
    assert ours == standard.get_span_context()


def test_malformed_or_missing_headers_start_a_new_trace():
    for headers in (None, [], [("traceparent", b"garbage")], [("traceparent", b"00-" + b"z" * 52)],
                    [("traceparent", None)], [("traceparent", b"00-" + b"0" * 32 + b"-" + b"1" * 16 + b"-01")]):
        assert trace_id_of(headers) is None
        with consumer_span("t", headers) as span:
            assert span.get_span_context().is_valid  # a fresh root, never an error


def test_sampled_flag_is_read_without_building_contexts():
    with tracer().start_as_current_span("root"):
        headers = inject_headers(None)
    assert is_sampled(headers)
    unsampled = [("traceparent", dict(headers)["traceparent"][:-2] + b"00")]
    assert not is_sampled(unsampled)
    assert not is_sampled(None)


def test_unsampled_records_keep_their_trace_id_downstream():
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    headers = [("traceparent", f"00-{trace_id}-00f067aa0ba902b7-00".encode())]
    with process_context("t", headers) as span:
        assert span is None  # no span paid for
        downstream = inject_headers(None)
    assert trace_id_of(downstream) == trace_id


def test_a_sampled_record_gets_the_consumer_span_the_sdk_would_record():
    from opentelemetry.trace import SpanKind

    from streams.tracing import current_context
    from tests.conftest import SPANS

    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    headers = [("traceparent", f"00-{trace_id}-00f067aa0ba902b7-01".encode()), ("tracestate", b"k=v")]
    SPANS.clear()
    with process_context("t.requests", headers, partition=2, offset=41, group="g") as handle:
        assert handle is not None
        downstream = inject_headers(None)
        with tracer().start_as_current_span("child", context=current_context()):
            pass
    spans: dict[str, Any] = {s.name: s for s in SPANS.get_finished_spans()}
    span = spans["process t.requests"]
    assert format(span.context.trace_id, "032x") == trace_id
    assert span.parent.span_id == 0x00f067aa0ba902b7 and span.parent.is_remote
    assert span.kind is SpanKind.CONSUMER and span.end_time >= span.start_time
    assert dict(span.attributes) == {"messaging.system": "kafka", "messaging.destination.name": "t.requests",
                                     "messaging.operation.type": "process",
                                     "messaging.destination.partition.id": "2", "messaging.kafka.offset": 41,
                                     "messaging.consumer.group.name": "g"}
    assert span.resource.attributes["service.name"] == "flywheel-tests"
    assert span.context.trace_state.get("k") == "v"
    # outputs and child spans hang below the consumer span
    assert dict(downstream)["traceparent"] == f"00-{trace_id}-{span.context.span_id:016x}-01".encode()
    assert spans["child"].parent.span_id == span.context.span_id


def test_an_unsampled_record_records_nothing_and_child_spans_stay_unsampled():
    from streams.tracing import current_context
    from tests.conftest import SPANS

    headers = [("traceparent", b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00")]
    SPANS.clear()
    with process_context("t", headers):
        assert inject_headers([("x", b"1")]) == [("x", b"1"), *headers]  # forwarded as it came
        with tracer().start_as_current_span("child", context=current_context()) as child:
            assert format(child.get_span_context().trace_id, "032x") == "4bf92f3577b34da6a3ce929d0e0e4736"
            assert not child.get_span_context().trace_flags.sampled
    assert SPANS.get_finished_spans() == ()
    assert inject_headers(None) == []  # nothing carried outside the record


def test_a_sampled_record_nested_in_an_unsampled_one_uses_its_own_context():
    outer = [("traceparent", b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00")]
    inner = [("traceparent", b"00-11111111111111111111111111111111-2222222222222222-01")]
    with process_context("t", outer), process_context("t", inner):
        assert trace_id_of(inject_headers(None)) == "11111111111111111111111111111111"
