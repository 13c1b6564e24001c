"""A consuming stage: decode -> handle -> commit, with dead letters and tracing.

The loop's invariant: an offset is committed only after every record before it was either
handled (the handler returned, so its outputs were produced and acknowledged) or published to
the stage's dead-letter topic. A crash anywhere re-delivers from the last commit: nothing
acknowledged is lost, and handlers make re-delivery harmless by deduplicating on event ids.

Handlers raise :class:`DeadLetterError` for a bad record (it is dead-lettered and the stage
moves on) and :class:`RetriableError` for a transient failure (the batch is retried after a
back-off, from the last committed offset). Anything else is a bug: it propagates and the
process exits for its supervisor to restart, without committing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiokafka import TopicPartition
from prometheus_client import Counter, Histogram

from core.errors import DeadLetterError, RetriableError
from streams.dlq import DeadLetters
from streams.kafka import EventConsumer, Received, next_offsets
from streams.tracing import process_context

log = logging.getLogger(__name__)

PROCESSED = Counter("flywheel_records_processed_total", "Records handled by a stage", ["stage", "topic"])
HANDLE_SECONDS = Histogram("flywheel_stage_handle_seconds", "Time to handle one batch", ["stage"])

Handler = Callable[[list[Received]], Awaitable[None]]


@dataclass(frozen=True)
class StageConfig:
    name: str
    batch_timeout_ms: int = 200
    max_records: int = 100
    retry_backoff_s: float = 0.5
    max_retry_backoff_s: float = 10.0


async def dead_letter_bad(batch: list[Received], dlq: DeadLetters) -> list[Received]:
    """Publish undecodable records to the DLQ; return the decodable ones."""
    good: list[Received] = []
    for item in batch:
        if item.error is None:
            good.append(item)
            continue
        await dlq.publish(item.consumed, item.error)
    return good


async def run_stage(consumer: EventConsumer, dlq: DeadLetters, handle_one: Callable[[Received], Awaitable[None]],
                    config: StageConfig, stop: asyncio.Event | None = None,
                    after_batch: Callable[[], Awaitable[None]] | None = None) -> None:
    """Consume until ``stop`` is set, handling records one at a time in order."""
    stop = stop or asyncio.Event()
    backoff = config.retry_backoff_s
    batches = consumer.batches(config.batch_timeout_ms, config.max_records)
    while not stop.is_set():
        batch = await anext(batches)
        if batch:
            try:
                with HANDLE_SECONDS.labels(config.name).time():
                    for item in await dead_letter_bad(batch, dlq):
                        r = item.record
                        with process_context(r.topic, item.headers, r.partition, r.offset, consumer.group_id):
                            try:
                                await handle_one(item)
                            except DeadLetterError as exc:
                                await dlq.publish(item.consumed, exc, item.event or item.typed)
                        PROCESSED.labels(config.name, r.topic).inc()
                await consumer.commit(next_offsets(batch))
                backoff = config.retry_backoff_s
            except RetriableError as exc:
                log.warning("%s: transient failure (%s); retrying from the last commit in %.1fs",
                            config.name, exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, config.max_retry_backoff_s)
                # Rewind every partition of the failed batch to its first uncommitted record.
                for tp, offset in _first_offsets(batch).items():
                    consumer.raw.seek(tp, offset)
        if after_batch is not None:
            await after_batch()


def _first_offsets(batch: list[Received]) -> dict[TopicPartition, int]:
    first: dict[TopicPartition, int] = {}
    for item in batch:
        tp = item.tp
        first[tp] = min(first.get(tp, item.record.offset), item.record.offset)
    return first
