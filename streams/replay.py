"""Record topics to an Avro container file and replay them, in order, into any cluster.

A recording holds every record's topic, partition, offset, timestamp, key, value and headers,
plus (in the file's metadata) the Avro schema behind every schema id it contains. On replay the
schemas are registered in the target registry and each value's 4-byte schema id is rewritten
to the target's id, so a recording made on one cluster replays correctly on another. Values
that are not in our wire format are replayed byte for byte.

Order: within a partition, offset order (always). Across partitions and topics, by timestamp,
then topic, partition and offset, which is the order in which they were appended.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fastavro
from aiokafka import AIOKafkaConsumer, TopicPartition

from core.errors import SerializationError
from streams.kafka import EventProducer, KafkaConfig, partitions_of
from streams.registry import SchemaRegistry, subject_for
from streams.serde import frame, unframe

RECORDING_SCHEMA = fastavro.parse_schema({
    "type": "record", "name": "RecordedRecord", "namespace": "dev.flywheel.replay",
    "fields": [
        {"name": "topic", "type": "string"},
        {"name": "partition", "type": "int"},
        {"name": "offset", "type": "long"},
        {"name": "timestamp", "type": "long"},
        {"name": "key", "type": ["null", "bytes"]},
        {"name": "value", "type": ["null", "bytes"]},
        {"name": "headers", "type": {"type": "array", "items": {
            "type": "record", "name": "RecordedHeader",
            "fields": [{"name": "key", "type": "string"}, {"name": "value", "type": ["null", "bytes"]}]}}},
    ],
})
SCHEMAS_META = "flywheel.schemas"
TOPICS_META = "flywheel.topics"


@dataclass
class Recorded:
    topic: str
    partition: int
    offset: int
    timestamp: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes | None]] = field(default_factory=list)

    def to_avro(self) -> dict[str, Any]:
        return {"topic": self.topic, "partition": self.partition, "offset": self.offset,
                "timestamp": self.timestamp, "key": self.key, "value": self.value,
                "headers": [{"key": k, "value": v} for k, v in self.headers]}

    @classmethod
    def from_avro(cls, raw: dict[str, Any]) -> Recorded:
        return cls(raw["topic"], raw["partition"], raw["offset"], raw["timestamp"], raw["key"], raw["value"],
                   [(h["key"], h["value"]) for h in raw["headers"]])

    def order_key(self) -> tuple[int, str, int, int]:
        return (self.timestamp, self.topic, self.partition, self.offset)


def schema_id_of(value: bytes | None) -> int | None:
    if value is None:
        return None
    try:
        return unframe(value)[0]
    except SerializationError:
        return None


async def read_topics(config: KafkaConfig, topics: list[str], timeout_s: float = 30.0,
                      committed_only: bool = True) -> list[Recorded]:
    """Everything in ``topics`` up to their current end offsets, without a consumer group.

    ``committed_only`` reads like any Flywheel consumer (``read_committed``): records of aborted
    transactions are not returned. Pass False to see everything the log holds.
    """
    layout = await partitions_of(config, topics)
    consumer = AIOKafkaConsumer(**config.client_kwargs(), enable_auto_commit=False, group_id=None,
                                auto_offset_reset="earliest",
                                isolation_level="read_committed" if committed_only else "read_uncommitted")
    await consumer.start()
    try:
        partitions = [TopicPartition(t, p) for t in topics for p in layout[t]]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        # The end of what this consumer can read: the last stable offset under read_committed.
        ends = await consumer.end_offsets(partitions)
        remaining = {tp for tp in partitions if ends[tp] > await consumer.position(tp)}
        out: list[Recorded] = []
        deadline = time.monotonic() + timeout_s
        while remaining and time.monotonic() < deadline:
            batch = await consumer.getmany(*remaining, timeout_ms=500)
            for tp, records in batch.items():
                for r in records:
                    if r.offset < ends[tp]:
                        out.append(Recorded(r.topic, r.partition, r.offset, r.timestamp, r.key, r.value,
                                            list(r.headers or [])))
                if await consumer.position(tp) >= ends[tp]:
                    remaining.discard(tp)
        if remaining:
            raise TimeoutError(f"could not read {sorted(map(str, remaining))} to their end in {timeout_s}s")
        return sorted(out, key=Recorded.order_key)
    finally:
        await consumer.stop()


async def record(config: KafkaConfig, registry: SchemaRegistry, topics: list[str], path: Path) -> int:
    """Write ``topics`` (up to now) to ``path``; returns the number of records."""
    records = await read_topics(config, topics)
    ids = sorted({i for r in records if (i := schema_id_of(r.value)) is not None})
    schemas: dict[str, str] = {}
    for schema_id in ids:
        try:
            schemas[str(schema_id)] = await registry.schema_by_id(schema_id)
        except SerializationError:
            continue  # framed-looking bytes with an unknown id are replayed verbatim
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as fh:
        fastavro.writer(fh, RECORDING_SCHEMA, (r.to_avro() for r in records), codec="deflate",
                        metadata={SCHEMAS_META: json.dumps(schemas), TOPICS_META: json.dumps(topics)})
    return len(records)


@dataclass
class Recording:
    records: list[Recorded]
    schemas: dict[int, str]
    topics: list[str]

    def __iter__(self) -> Iterator[Recorded]:
        return iter(self.records)


def load_recording(path: Path) -> Recording:
    with path.open("rb") as fh:
        reader = fastavro.reader(fh)
        meta = reader.metadata
        records = [Recorded.from_avro(raw) for raw in reader]  # type: ignore[arg-type]
    schemas = {int(k): v for k, v in json.loads(meta.get(SCHEMAS_META, "{}")).items()}
    return Recording(records, schemas, json.loads(meta.get(TOPICS_META, "[]")))


async def replay(recording: Recording, producer: EventProducer, registry: SchemaRegistry, prefix: str = "",
                 pace: str = "fast", speed: float = 1.0, partitions: dict[str, int] | None = None) -> int:
    """Republish in order into ``prefix + topic``. ``pace``: ``fast`` or ``recorded`` (x ``speed``)."""
    id_map: dict[int, int] = {}
    for old_id, schema in recording.schemas.items():
        topic = next((r.topic for r in recording.records if schema_id_of(r.value) == old_id), None)
        if topic is not None:
            id_map[old_id] = await registry.register(subject_for(prefix + topic), schema)
    first_ts = recording.records[0].timestamp if recording.records else 0
    started = time.monotonic()
    futures = []
    for r in recording.records:
        if pace == "recorded":
            due = (r.timestamp - first_ts) / 1000.0 / speed
            delay = due - (time.monotonic() - started)
            if delay > 0:
                await asyncio.sleep(delay)
        value = r.value
        value_id = schema_id_of(value)
        if value is not None and value_id is not None and value_id in id_map:
            value = frame(id_map[value_id], bytes(unframe(value)[1]))
        target = prefix + r.topic
        partition: int | None = r.partition
        if partitions is not None and r.partition >= partitions.get(target, r.partition + 1):
            partition = None  # target has fewer partitions: let the key decide
        futures.append(await producer.send_raw(target, value, r.key, [(k, v or b"") for k, v in r.headers],
                                               partition=partition, timestamp_ms=r.timestamp))
    await asyncio.gather(*futures)
    return len(futures)
