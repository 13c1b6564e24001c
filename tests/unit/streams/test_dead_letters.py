"""Dead letters carry the envelope of the event that failed, whether a dict or a typed event."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from core.errors import ValidationError
from streams.consumed import Consumed
from streams.contracts import InferenceRequest
from streams.dlq import DeadLetters
from tests.factories import samples


class RecordingProducer:
    """A fake producer: keeps what would have been sent."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, Any], Any]] = []

    async def send_and_wait(self, topic: str, record: dict[str, Any], key: Any = None) -> None:
        self.sent.append((topic, record, key))


@pytest.mark.parametrize("typed", [False, True])
async def test_dead_letter_carries_the_envelope(typed):
    producer = RecordingProducer()
    letters = DeadLetters(producer, "flywheel.dlq.router", "router")  # type: ignore[arg-type]
    event = samples()["InferenceRequest"]
    if typed:
        event = msgspec.convert(event | {"event_time": 1}, InferenceRequest)
    received = Consumed("flywheel.requests", 2, 7, b"user-1", b"\x00bad", (("traceparent", b"x"),))
    await letters.publish(received, ValidationError("max_tokens=0"), event)
    [(topic, record, key)] = producer.sent
    assert topic == "flywheel.dlq.router" and key == b"user-1"
    assert (record["correlation_id"], record["tenant_id"], record["user_id"]) == ("req-1", "tenant-a", "user-1")
    assert record["reason"] == "max_tokens=0" and record["error_type"] == "ValidationError"
    assert (record["origin_topic"], record["origin_partition"], record["origin_offset"]) == ("flywheel.requests", 2, 7)
    assert record["origin_value"] == b"\x00bad" and record["origin_headers"] == [{"key": "traceparent", "value": b"x"}]


async def test_a_consumed_record_is_taken_as_it_was_on_the_broker():
    class Message:  # the shape of aiokafka's ConsumerRecord and faust's Message
        topic, partition, offset, key, value, headers = "t", 1, 9, None, b"v", [("h", b"1")]

    assert Consumed.of(Message()) == Consumed("t", 1, 9, None, b"v", (("h", b"1"),))


def test_mapping_headers_are_kept_as_pairs():
    class FaustMessage:
        topic, partition, offset, key, value, headers = "t", 0, 1, b"k", b"v", {"traceparent": b"x"}

    assert Consumed.of(FaustMessage()).headers == (("traceparent", b"x"),)
