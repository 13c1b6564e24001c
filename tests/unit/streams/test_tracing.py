"""W3C trace context in Kafka headers: our fast path agrees with OpenTelemetry's propagator."""

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
