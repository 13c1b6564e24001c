"""An in-memory broker for unit tests of stages on the shared loop (``streams.stage_loop``).

It keeps what a real broker's guarantees are about: a consumer group's committed (offset,
metadata) per partition, and an output log in which a transaction's records become visible only
when it commits (a read_committed reader's view). Records are decoded events already (the serde
has its own tests); a record can carry a decode error instead, as ``EventConsumer`` returns it.

    broker = FakeBroker(transactions=True)
    broker.append("in", 0, {"n": 1})
    consumer, producer = broker.consumer("group"), broker.producer()
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from aiokafka import ConsumerRebalanceListener, ConsumerRecord, TopicPartition

from core.errors import DeadLetterError, RetriableError
from streams.contracts import Event
from streams.kafka import Received

Positions = dict[TopicPartition, tuple[int, str]]


@dataclass
class Produced:
    topic: str
    record: dict[str, Any] | Event
    key: str | bytes | None


@dataclass
class FakeBroker:
    transactions: bool = True
    logs: dict[TopicPartition, list[Received]] = field(default_factory=dict)
    committed: dict[str, Positions] = field(default_factory=dict)
    """Each group's committed (offset, metadata) per partition."""
    visible: list[Produced] = field(default_factory=list)
    """Produced records a read_committed reader sees (a transaction's only once it commits)."""
    aborted: int = 0

    def append(self, topic: str, partition: int, event: dict[str, Any] | None, *,
               error: DeadLetterError | None = None, key: bytes | None = b"k") -> int:
        """Append a record (a decoded event, or an undecodable one with ``error``); its offset."""
        tp = TopicPartition(topic, partition)
        log = self.logs.setdefault(tp, [])
        value = b"undecodable" if error is not None else repr(event).encode()
        record = ConsumerRecord(topic, partition, len(log), 0, 0, key, value, None, 0, len(value),
                                [("traceparent", b"00-" + b"0" * 31 + b"1-" + b"0" * 15 + b"1-00")])
        log.append(Received(record, event=event, error=error))
        return len(log) - 1

    def consumer(self, group: str, max_batch: int = 100) -> FakeConsumer:
        return FakeConsumer(self, group, max_batch)

    def producer(self, fail_sends: int = 0, transactional: bool | None = None) -> FakeProducer:
        """A producer, transactional when the broker has transactions unless ``transactional`` says."""
        return FakeProducer(self, fail_sends, self.transactions if transactional is None else transactional)

    def outputs(self, topic: str) -> list[dict[str, Any] | Event]:
        return [p.record for p in self.visible if p.topic == topic]


class FakeConsumer:
    """Reads its assigned partitions from the group's committed positions, ``max_batch`` at a time."""

    def __init__(self, broker: FakeBroker, group: str, max_batch: int) -> None:
        self.broker = broker
        self.group_id: str | None = group
        self.max_batch = max_batch
        self.owned: set[TopicPartition] = set()
        self.positions: dict[TopicPartition, int] = {}
        self.listener: ConsumerRebalanceListener | None = None
        self.topics: list[str] = []

    def subscribe(self, topics: list[str], listener: ConsumerRebalanceListener) -> None:
        self.topics, self.listener = topics, listener

    async def assign(self, tps: set[TopicPartition]) -> None:
        """The group coordinator gives this consumer ``tps`` (positions from the group's commits)."""
        committed = self.broker.committed.get(self.group_id or "", {})
        for tp in tps:
            self.positions[tp] = committed.get(tp, (0, ""))[0]
        self.owned |= tps
        if self.listener is not None:
            await self.listener.on_partitions_assigned(tps)

    async def revoke(self, tps: set[TopicPartition]) -> None:
        """The group coordinator takes ``tps`` away (a second consumer joined)."""
        if self.listener is not None:
            await self.listener.on_partitions_revoked(tps)
        self.owned -= tps
        for tp in tps:
            self.positions.pop(tp, None)

    def assignment(self) -> set[TopicPartition]:
        return set(self.owned)

    async def batches(self, timeout_ms: int = 0, max_records: int = 100) -> AsyncIterator[list[Received]]:
        while True:
            batch: list[Received] = []
            for tp in sorted(self.owned):
                log = self.broker.logs.get(tp, [])
                start = self.positions[tp]
                taken = log[start:start + min(max_records, self.max_batch) - len(batch)]
                self.positions[tp] = start + len(taken)
                batch += taken
            await asyncio.sleep(0)
            yield batch

    async def commit(self, offsets: Positions) -> None:
        if not set(offsets) <= self.owned:
            raise AssertionError(f"committed partitions it does not own: {set(offsets) - self.owned}")
        self.broker.committed.setdefault(self.group_id or "", {}).update(offsets)


class FakeProducer:
    """Produces into the broker's log, in transactions when ``transactional``. The first
    ``fail_sends`` sends raise ``RetriableError`` (a broker that went away mid-transaction)."""

    def __init__(self, broker: FakeBroker, fail_sends: int = 0, transactional: bool = True) -> None:
        self.broker = broker
        self.fail_sends = fail_sends
        self._transactional = transactional
        self._pending: list[Produced] | None = None
        self._offsets: dict[str, Positions] = {}
        self.dead_letters: list[dict[str, Any]] = []

    @property
    def transactional(self) -> bool:
        return self._transactional

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        assert self.transactional and self._pending is None, "no nested or non-transactional transactions"
        self._pending, self._offsets = [], {}
        try:
            yield
        except BaseException:
            self.broker.aborted += 1
            raise
        else:
            self.broker.visible += self._pending
            for group, offsets in self._offsets.items():
                self.broker.committed.setdefault(group, {}).update(offsets)
        finally:
            self._pending = None

    async def send_offsets_to_transaction(self, offsets: Positions, group_id: str) -> None:
        assert self._pending is not None, "offsets outside a transaction"
        self._offsets.setdefault(group_id, {}).update(offsets)

    async def send(self, topic: str, record: dict[str, Any] | Event, key: str | bytes | None = None) -> Any:
        if self.fail_sends > 0:
            self.fail_sends -= 1
            raise RetriableError("broker went away")
        produced = Produced(topic, record, key)
        if self._pending is not None:
            self._pending.append(produced)
        else:
            self.broker.visible.append(produced)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    async def send_and_wait(self, topic: str, record: dict[str, Any], key: Any = None) -> None:
        """Dead letters: outside any transaction, acknowledged at once."""
        self.dead_letters.append(record)
        self.broker.visible.append(Produced(topic, record, key))

