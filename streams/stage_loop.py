"""The one consume -> decode -> handle -> produce -> dead-letter -> commit loop of every stage.

A stage keeps only its handler; the loop owns delivery:

- **Fetch and decode in batches** (``EventConsumer.batches``: schema ids resolved once per batch).
- **Skip what is already finished**: offsets a previous owner finished out of order travel in the
  committed offset's metadata (``streams.offsets``) and are restored on assignment.
- **Dead-letter, never crash, never drop**: an undecodable record, or one the handler rejects
  (``DeadLetterError`` in the per-record form, ``StageLoop.dead_letter`` in the batch form), goes
  to the stage's dead-letter topic with the reason, acknowledged before any commit passes it.
- **Handle**: the handler gets the batch's fresh records and returns the outputs to produce. A
  record it ``hold``s stays open (continuous batching, rollouts waiting for rewards) until the
  stage calls ``commit(finished=...)``; every other record is finished when the handler returns.
- **Commit**: outputs and the offsets they finish go out in ONE transaction where the broker has
  transactions (a crash leaves both or neither); elsewhere outputs are acknowledged first and the
  offsets committed after (at-least-once: readers deduplicate by event id). A position only moves
  past finished offsets (``OffsetTracker``), so out-of-order completion commits the contiguous
  prefix and carries the rest in the metadata.
- **Retry**: a ``RetriableError`` from the handler retries the batch's unheld records after a
  back-off (doubling, bounded); any other error propagates and the process exits without
  committing, for its supervisor to restart it (re-delivery from the last commit).
- **Rebalance**: a revocation first waits for the batch being handled to commit (its outputs
  and offsets together), then runs the stage's own ``on_revoked`` hook (e.g. the worker aborts
  generation in flight) and forgets the partitions: held work not yet committed is abandoned and
  the new owner re-reads it from the committed position. An assigned partition is restored from
  its commit metadata before its first records are handled (not in the assignment callback:
  aiokafka may fetch before that callback has run). Nothing of a partition this consumer no
  longer owns is committed after.

Invariant: an offset is committed only after its record's outputs were produced in the same
transaction (or acknowledged before), or its dead letter was acknowledged, or it was skipped as
finished before. Nothing acknowledged is lost; nothing committed is redone.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Protocol

from aiokafka import ConsumerRebalanceListener, TopicPartition
from prometheus_client import Counter, Histogram

from core.errors import DeadLetterError, RetriableError
from streams.contracts import Event
from streams.dlq import DeadLetters
from streams.kafka import Received
from streams.offsets import OffsetTracker
from streams.tracing import process_context

log = logging.getLogger(__name__)

PROCESSED = Counter("flywheel_records_processed_total", "Records handled by a stage", ["stage", "topic"])
HANDLE_SECONDS = Histogram("flywheel_stage_handle_seconds", "Time to handle one batch", ["stage"])

Positions = dict[TopicPartition, tuple[int, str]]


@dataclass(frozen=True)
class StageConfig:
    name: str
    """The stage's name (metrics labels, log lines)."""
    batch_timeout_ms: int = 200
    """How long one fetch waits for records (an empty batch still runs ``after_batch``)."""
    max_records: int = 100
    """Records fetched per batch at most."""
    retry_backoff_s: float = 0.5
    """First wait before a batch is retried after a ``RetriableError`` (doubles per failure)."""
    max_retry_backoff_s: float = 10.0
    """Longest wait between retries."""

    def __post_init__(self) -> None:
        if self.max_records < 1 or self.batch_timeout_ms < 0:
            raise ValueError(f"max_records={self.max_records} must be >= 1 and "
                             f"batch_timeout_ms={self.batch_timeout_ms} >= 0")
        if not 0 <= self.retry_backoff_s <= self.max_retry_backoff_s:
            raise ValueError(f"need 0 <= retry_backoff_s={self.retry_backoff_s} <= "
                             f"max_retry_backoff_s={self.max_retry_backoff_s}")


@dataclass(frozen=True, slots=True)
class Output:
    """One event to produce. With ``origin`` it is produced inside the origin record's trace."""

    topic: str
    record: dict[str, Any] | Event
    key: str | bytes | None = None
    origin: Received | None = None


class StageConsumer(Protocol):
    """What the loop needs of a consumer (``EventConsumer``; a fake in unit tests)."""

    group_id: str | None

    def batches(self, timeout_ms: int = ..., max_records: int = ...) -> AsyncIterator[list[Received]]: ...
    def assignment(self) -> set[TopicPartition]: ...
    def subscribe(self, topics: list[str], listener: ConsumerRebalanceListener) -> None: ...
    async def commit(self, offsets: Positions) -> None: ...


class StageProducer(Protocol):
    """What the loop needs of a producer (``EventProducer``; a fake in unit tests)."""

    @property
    def transactional(self) -> bool: ...
    def transaction(self) -> AbstractAsyncContextManager[Any]: ...
    async def send_offsets_to_transaction(self, offsets: Positions, group_id: str) -> None: ...
    async def send(self, topic: str, record: dict[str, Any] | Event, key: str | bytes | None = None) -> Any: ...


BatchHandler = Callable[[list[Received]], Awaitable[Sequence[Output]]]
RecordHandler = Callable[[Received], Awaitable[Sequence[Output] | None]]
CommittedReader = Callable[[set[TopicPartition]], Awaitable[Positions]]


class StageLoop:
    """One consumer group's loop: see the module docstring for what it guarantees."""

    def __init__(self, consumer: StageConsumer, producer: StageProducer, dlq: DeadLetters, group: str,
                 config: StageConfig, committed: CommittedReader | None = None) -> None:
        if getattr(dlq.producer, "transactional", False):
            raise ValueError(f"stage {config.name}: dead letters need a producer outside transactions "
                             "(they are acknowledged one by one, before the commit that passes them)")
        self.consumer = consumer
        self.producer = producer
        self.dlq = dlq
        self.group = group
        self.config = config
        self.committed = committed
        """Reads a group's committed (offset, metadata) per partition; None: nothing to restore."""
        self.tracker = OffsetTracker()
        self.lock = asyncio.Lock()
        """Held while offsets are computed and committed, and while partitions change owner."""
        self._batch = asyncio.Lock()
        """Held from a batch's screening to its commit: a revocation waits for it, so a batch's
        outputs and offsets commit together before its partitions move to their next owner."""
        self._held: set[tuple[TopicPartition, int]] = set()
        self._dead: set[tuple[TopicPartition, int]] = set()  # dead-lettered in the batch being handled
        self._restored: set[TopicPartition] = set()  # partitions whose commit metadata the tracker holds

    # -- rebalances ------------------------------------------------------------------------------
    def subscribe(self, topics: list[str],
                  on_revoked: Callable[[set[TopicPartition]], Awaitable[None]] | None = None) -> None:
        """Subscribe with a rebalance listener (before ``consumer.start()``)."""
        stage = self

        class Listener(ConsumerRebalanceListener):
            async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
                await stage.revoked(set(revoked), on_revoked)

            async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
                await stage.assigned(set(assigned))
                log.info("%s: assigned %s", stage.config.name, sorted((tp.topic, tp.partition) for tp in assigned))

        self.consumer.subscribe(topics, Listener())

    async def revoked(self, revoked: set[TopicPartition],
                      on_revoked: Callable[[set[TopicPartition]], Awaitable[None]] | None = None) -> None:
        """Abandon the uncommitted work of revoked partitions (their new owner re-reads it). Waits
        for the batch being handled to commit and for any commit in flight, so the new owner
        starts exactly after them; ``on_revoked`` (the stage's own abandoning) runs first."""
        async with self._batch:
            if on_revoked is not None:
                await on_revoked(revoked)
            async with self.lock:
                self.tracker.forget(revoked)
                self._restored -= revoked
                self._held = {h for h in self._held if h[0] not in revoked}

    async def assigned(self, assigned: set[TopicPartition]) -> None:
        """Newly assigned partitions are restored from their commit metadata when their first
        records arrive (``screen``): the consumer may fetch them before this callback has run."""
        async with self.lock:
            self._restored -= assigned

    async def _restore(self, tps: set[TopicPartition]) -> None:
        """Seed partitions' committed positions and the offsets finished beyond them. Runs before
        their first records are screened, so nothing handled since is overwritten."""
        found = await self.committed(tps) if self.committed is not None else {}
        async with self.lock:
            for tp in tps:
                if tp in found:
                    offset, metadata = found[tp]
                    self.tracker.restore(tp, offset, metadata)
                self._restored.add(tp)

    # -- what a handler may call -----------------------------------------------------------------
    def hold(self, item: Received) -> None:
        """Keep ``item`` open after the handler returns: it finishes with ``commit(finished=...)``."""
        self._held.add((item.tp, item.record.offset))

    async def dead_letter(self, item: Received, error: Exception,
                          event: dict[str, Any] | Event | None = None) -> None:
        """Publish ``item`` to the dead-letter topic with the reason (acknowledged before returning)."""
        await self.dlq.publish(item.consumed, error, event if event is not None else (item.event or item.typed))
        self._dead.add((item.tp, item.record.offset))

    # -- committing ------------------------------------------------------------------------------
    async def commit(self, outputs: Sequence[Output] = (),
                     finished: Iterable[tuple[TopicPartition, int]] = ()) -> Positions:
        """Produce ``outputs`` and commit every position that moved (``finished``: held offsets
        done now), atomically where the broker has transactions. Returns what was committed."""
        async with self.lock:
            for tp, offset in finished:
                self._held.discard((tp, offset))
                self.tracker.close(tp, offset)
            owned = self.consumer.assignment()
            positions = {tp: p for tp, p in self.tracker.positions().items() if tp in owned}
            if not outputs and not positions:
                return {}
            if self.producer.transactional:
                async with self.producer.transaction():
                    await self._send(outputs)
                    if positions:
                        await self.producer.send_offsets_to_transaction(positions, self.group)
            else:
                await asyncio.gather(*await self._send(outputs))
                if positions:
                    await self.consumer.commit(positions)
            self.tracker.mark_committed(positions)
            return positions

    async def _send(self, outputs: Sequence[Output]) -> list[Any]:
        futures = []
        group = self.consumer.group_id
        for out in outputs:
            if out.origin is None:
                futures.append(await self.producer.send(out.topic, out.record, key=out.key))
                continue
            r = out.origin.record
            with process_context(r.topic, out.origin.headers, r.partition, r.offset, group):
                futures.append(await self.producer.send(out.topic, out.record, key=out.key))
        return futures

    # -- the loop --------------------------------------------------------------------------------
    async def screen(self, batch: list[Received]) -> list[Received]:
        """Mark a fetched batch open; return its fresh, decoded records. Records finished before
        (restored metadata) are skipped, undecodable ones dead-lettered; both finish at once."""
        fresh: list[Received] = []
        tracker = self.tracker
        owned = self.consumer.assignment()
        unrestored = {item.tp for item in batch} & owned - self._restored
        if unrestored:
            await self._restore(unrestored)
        for item in batch:
            tp, offset = item.tp, item.record.offset
            if tp not in owned:
                continue  # revoked while fetched: its new owner reads it
            if tracker.is_done(tp, offset):
                tracker.seen_offset(tp, offset, open_=False)
                continue
            if item.error is not None:
                await self.dlq.publish(item.consumed, item.error)
                tracker.seen_offset(tp, offset, open_=False)
                continue
            # Open before the handler runs: a concurrent commit (a held record finishing) must
            # never move a position past a record of this batch that is still being handled.
            tracker.seen_offset(tp, offset, open_=True)
            fresh.append(item)
        return fresh

    async def handle(self, fresh: list[Received], handler: BatchHandler, stop: asyncio.Event) -> Sequence[Output]:
        """Run the handler on ``fresh``, retrying a ``RetriableError`` (after a back-off) on the
        records it neither held nor dead-lettered, until it succeeds or ``stop`` is set."""
        backoff = self.config.retry_backoff_s
        while True:
            try:
                with HANDLE_SECONDS.labels(self.config.name).time():
                    return await handler(fresh)
            except RetriableError as exc:
                log.warning("%s: transient failure (%s); retrying %d records in %.1fs",
                            self.config.name, exc, len(fresh), backoff)
                if stop.is_set():
                    raise
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.config.max_retry_backoff_s)
                owned = self.consumer.assignment()
                done = self._held | self._dead
                fresh = [i for i in fresh if i.tp in owned and (i.tp, i.record.offset) not in done]

    async def process(self, batch: list[Received], handler: BatchHandler, stop: asyncio.Event) -> None:
        """One batch: screen, handle, produce its outputs and commit what it finished."""
        async with self._batch:
            fresh = await self.screen(batch)
            outputs: Sequence[Output] = ()
            if fresh:
                self._dead.clear()
                outputs = await self.handle(fresh, handler, stop)
            finished = [(i.tp, i.record.offset) for i in fresh if (i.tp, i.record.offset) not in self._held]
            await self.commit(outputs, finished)
        for item in fresh:
            PROCESSED.labels(self.config.name, item.record.topic).inc()

    async def run(self, handler: BatchHandler, stop: asyncio.Event | None = None,
                  after_batch: Callable[[list[Received]], Awaitable[None]] | None = None,
                  ready: Callable[[], bool] | None = None) -> None:
        """Consume until ``stop`` is set. ``after_batch`` runs after every fetch (empty ones too,
        for periodic work); while ``ready()`` is false nothing is fetched (backpressure: Kafka
        holds the rest)."""
        stop = stop or asyncio.Event()
        batches = self.consumer.batches(self.config.batch_timeout_ms, self.config.max_records)
        while not stop.is_set():
            if ready is not None and not ready():
                await asyncio.sleep(0.05)
                continue
            batch = await anext(batches)
            if batch:
                await self.process(batch, handler, stop)
            if after_batch is not None:
                await after_batch(batch)


def each_record(handle_one: RecordHandler, stage: StageLoop) -> BatchHandler:
    """A batch handler from a per-record one: records handled in order, each in its trace
    context; a ``DeadLetterError`` dead-letters that record with the reason and the batch goes
    on; the outputs of all records are produced together with the batch's offsets."""

    async def handle(batch: list[Received]) -> list[Output]:
        outputs: list[Output] = []
        group = stage.consumer.group_id
        for item in batch:
            r = item.record
            with process_context(r.topic, item.headers, r.partition, r.offset, group):
                try:
                    produced = await handle_one(item)
                except DeadLetterError as exc:
                    await stage.dead_letter(item, exc)
                    continue
            if produced:
                outputs.extend(produced)
        return outputs

    return handle

