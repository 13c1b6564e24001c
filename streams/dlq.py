"""Dead-letter publishing: a record a stage cannot process becomes a DeadLetter event with the
original bytes, origin topic/partition/offset and the reason; then the stage moves on.

The DeadLetter is produced and acknowledged *before* the stage commits past the bad record's
offset, so a bad record is never lost, only moved.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from typing import Any

from prometheus_client import Counter

from streams.consumed import Consumed
from streams.contracts import Event
from streams.events import envelope
from streams.kafka import EventProducer

log = logging.getLogger(__name__)

DEAD_LETTERS = Counter("flywheel_dead_letters_total", "Records sent to a dead-letter topic",
                       ["stage", "origin_topic", "error_type"])


def dead_letter_event(*, stage: str, topic: str, partition: int, offset: int, key: bytes | None,
                      value: bytes | None, headers: Sequence[tuple[str, bytes | None]] | None,
                      reason: str, error_type: str, correlation_id: str = "", tenant_id: str = "",
                      user_id: str = "", attempts: int = 1) -> dict[str, Any]:
    # The id is derived from where the record came from, so a stage that dead-letters the same
    # record twice (a retry after a crash) produces the same event id and readers can dedupe.
    event_id = hashlib.sha256(f"{stage}:{topic}:{partition}:{offset}".encode()).hexdigest()[:32]
    return {
        **envelope(correlation_id, tenant_id, user_id, event_id=event_id),
        "stage": stage,
        "origin_topic": topic,
        "origin_partition": partition,
        "origin_offset": offset,
        "origin_key": key,
        "origin_value": value,
        "origin_headers": [{"key": k, "value": v} for k, v in (headers or [])],
        "reason": reason[:4000],
        "error_type": error_type,
        "attempts": attempts,
    }


class DeadLetters:
    """Publishes one stage's dead letters to ``flywheel.dlq.<stage>``."""

    def __init__(self, producer: EventProducer, topic: str, stage: str) -> None:
        self.producer = producer
        self.topic = topic
        self.stage = stage

    async def publish(self, received: Consumed, error: Exception,
                      event: dict[str, Any] | Event | None = None) -> None:
        """Publish ``received`` with the reason ``error`` gives; ``event`` (when it decoded) lends
        its envelope (correlation, tenant and user ids) to the dead letter."""
        reason = getattr(error, "reason", None) or str(error) or type(error).__name__
        envelope_of = event if isinstance(event, dict) else (
            {"correlation_id": event.correlation_id, "tenant_id": event.tenant_id, "user_id": event.user_id}
            if event is not None else {})
        r = received
        record = dead_letter_event(
            stage=self.stage, topic=r.topic, partition=r.partition, offset=r.offset, key=r.key, value=r.value,
            headers=r.headers, reason=reason, error_type=type(error).__name__,
            correlation_id=str(envelope_of.get("correlation_id", "")),
            tenant_id=str(envelope_of.get("tenant_id", "")),
            user_id=str(envelope_of.get("user_id", "")),
        )
        log.warning("dead letter from %s[%d]@%d (%s): %s", r.topic, r.partition, r.offset, self.stage, reason)
        await self.producer.send_and_wait(self.topic, record, key=r.key)
        DEAD_LETTERS.labels(self.stage, r.topic, type(error).__name__).inc()
