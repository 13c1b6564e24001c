"""A consuming stage that handles records one at a time, in order, on the shared loop.

``run_stage`` is ``streams.stage_loop.StageLoop`` with a per-record handler: decode -> handle ->
produce -> commit, with dead letters and tracing. The invariant is the loop's: an offset is
committed only after every record before it was either handled (its outputs produced with the
commit, or acknowledged before it) or published to the stage's dead-letter topic. A crash anywhere
re-delivers from the last commit: nothing acknowledged is lost, and handlers make re-delivery
harmless by deduplicating on event ids (or producing only through the loop, transactionally).

Handlers raise :class:`DeadLetterError` for a bad record (it is dead-lettered and the stage
moves on) and :class:`RetriableError` for a transient failure (the batch is retried after a
back-off). Anything else is a bug: it propagates and the process exits for its supervisor to
restart, without committing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from streams.dlq import DeadLetters
from streams.kafka import EventConsumer, Received
from streams.stage_loop import RecordHandler, StageConfig, StageLoop, StageProducer, each_record

__all__ = ["StageConfig", "run_stage"]


async def run_stage(consumer: EventConsumer, dlq: DeadLetters, handle_one: RecordHandler,
                    config: StageConfig, stop: asyncio.Event | None = None,
                    after_batch: Callable[[], Awaitable[None]] | None = None,
                    producer: StageProducer | None = None) -> None:
    """Consume until ``stop`` is set, handling records one at a time in order. ``handle_one`` may
    return outputs: they are produced by ``producer`` (the dead-letter producer when None) with the
    batch's offsets, in one transaction when that producer is transactional."""
    stage = StageLoop(consumer, producer or dlq.producer, dlq, consumer.group_id or config.name, config)

    async def after(_: list[Received]) -> None:
        if after_batch is not None:
            await after_batch()

    await stage.run(each_record(handle_one, stage), stop, after)
