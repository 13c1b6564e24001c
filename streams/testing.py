"""Test a stream pipeline by replaying a recording through it and comparing with a golden recording.

    diff = await golden_replay(
        services, Path("tests/golden/feedback.avro"), outputs=["rewards"],
        pipeline=lambda prefix: run_my_agent(prefix),       # async context manager
        golden=Path("tests/golden/rewards.avro"))
    assert diff.ok, diff.explain()

The recording is replayed into fresh topics under a unique prefix, so tests never see each other's
data. The pipeline is started with that prefix (e.g. a subprocess with ``FLYWHEEL_TOPIC_PREFIX``),
its output topics are read until they hold as many records as the golden recording, and both sides
are decoded and normalised (volatile fields such as event times dropped) before comparison. Records
are compared per key in order, which is the only order Kafka guarantees across partitions.
Set ``update=True`` (or ``FLYWHEEL_UPDATE_GOLDEN=1``) to (re)write the golden file instead.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient

from streams.kafka import EventProducer
from streams.replay import Recorded, load_recording, read_topics, record, replay
from streams.schemas import load_contracts
from streams.serde import AvroSerde
from streams.topics import TopicCatalog, ensure_topics

VOLATILE = ("event_time",)
_CATALOG_NAME = re.compile(r"^(?P<prefix>.*)flywheel\.[a-z0-9.-]+$")


@dataclass
class GoldenDiff:
    expected: dict[str, list[str]]
    actual: dict[str, list[str]]
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.missing and not self.unexpected

    def explain(self) -> str:
        lines = [f"missing ({len(self.missing)}):", *self.missing[:10],
                 f"unexpected ({len(self.unexpected)}):", *self.unexpected[:10]]
        return "\n".join(lines)


def normalise(event: dict[str, Any], ignore: Iterable[str]) -> str:
    """Canonical JSON of an event without the ignored (volatile) fields."""
    drop = set(ignore)

    def clean(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items() if k not in drop}
        if isinstance(value, list):
            return [clean(v) for v in value]
        if isinstance(value, bytes):
            return value.hex()
        if hasattr(value, "timestamp"):
            return int(value.timestamp() * 1000)
        return value

    return json.dumps(clean(event), sort_keys=True)


async def _decode_by_key(serde: AvroSerde, records: list[Recorded], ignore: Iterable[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = defaultdict(list)
    for r in records:
        _, event = await serde.deserialize(r.value)
        out[(r.key or b"").decode(errors="replace")].append(normalise(event, ignore))
    return dict(out)


def recording_prefix(topics: Iterable[str]) -> str:
    """The catalogue prefix a recording was made under ('' for the default catalogue)."""
    prefixes = {m.group("prefix") for t in topics if (m := _CATALOG_NAME.match(t))}
    if len(prefixes) != 1:
        raise ValueError(f"recording mixes catalogue prefixes or has no catalogue topics: {sorted(prefixes)}")
    return prefixes.pop()


async def golden_replay(
    services: Any, recording: Path, outputs: list[str],
    pipeline: Callable[[str], AbstractAsyncContextManager[Any]], golden: Path, *,
    ignore: Iterable[str] = VOLATILE, timeout_s: float = 90.0, update: bool | None = None,
) -> GoldenDiff:
    """Replay ``recording`` through ``pipeline`` and compare its ``outputs`` with ``golden``."""
    update = bool(os.environ.get("FLYWHEEL_UPDATE_GOLDEN")) if update is None else update
    source = load_recording(recording)
    run_prefix = f"golden{uuid.uuid4().hex[:8]}."
    catalog: TopicCatalog = services.catalog.with_prefix(run_prefix + recording_prefix(source.topics))
    admin = AIOKafkaAdminClient(**services.kafka.client_kwargs())
    await admin.start()
    try:
        await ensure_topics(admin, catalog.specs())
    finally:
        await admin.close()
    serde = AvroSerde(services.registry)
    contracts = load_contracts()
    for spec in catalog.specs():
        await serde.bind(spec.name, contracts[spec.contract])
    output_topics = [getattr(catalog, name.replace("-", "_")) for name in outputs]
    expected_records = load_recording(golden).records if golden.exists() and not update else None
    producer = EventProducer(services.kafka, serde, services.capabilities)
    await producer.start()
    try:
        async with pipeline(catalog.prefix):
            await replay(source, producer, services.registry, prefix=run_prefix)
            actual_records = await _wait_for_outputs(services, output_topics, expected_records, timeout_s)
    finally:
        await producer.stop()
    actual = await _decode_by_key(serde, actual_records, ignore)
    if expected_records is None:
        await record(services.kafka, services.registry, output_topics, golden)
        return GoldenDiff(actual, actual)
    expected = await _decode_by_key(serde, expected_records, ignore)
    missing, unexpected = [], []
    for key in set(expected) | set(actual):
        exp, act = expected.get(key, []), actual.get(key, [])
        missing += [f"{key}: {e}" for e in exp if e not in act]
        unexpected += [f"{key}: {a}" for a in act if a not in exp]
        if not missing and not unexpected and exp != act:
            missing.append(f"{key}: same records in a different order")
    return GoldenDiff(expected, actual, missing, unexpected)


async def _wait_for_outputs(services: Any, topics: list[str], expected: list[Recorded] | None,
                            timeout_s: float) -> list[Recorded]:
    """Poll the output topics until they hold the golden count (or go quiet when recording)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    last_count, quiet_since = -1, loop.time()
    while True:
        records = await read_topics(services.kafka, topics)
        if expected is not None and len(records) >= len(expected):
            return records
        if len(records) != last_count:
            last_count, quiet_since = len(records), loop.time()
        elif expected is None and records and loop.time() - quiet_since > 5.0:
            return records
        if loop.time() > deadline:
            return records  # the comparison reports whatever is missing
        await asyncio.sleep(0.5)
