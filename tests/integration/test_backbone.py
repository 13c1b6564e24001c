"""The event backbone on the real Apache Kafka broker and the embedded Postgres."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from core.errors import IncompatibleSchemaError
from streams.dlq import DeadLetters
from streams.kafka import EventConsumer, EventProducer
from streams.registry import PostgresRegistry
from streams.replay import load_recording, read_topics, record, replay
from streams.schemas import load_contracts
from streams.serde import frame
from streams.stage import StageConfig, run_stage
from streams.topics import ensure_topics
from tests.conftest import flywheel_env
from tests.factories import samples
from tests.unit.streams.test_contracts import normalise

pytestmark = pytest.mark.integration


async def _producer(services) -> EventProducer:
    producer = EventProducer(services.kafka, services.serde, services.capabilities)
    await producer.start()
    return producer


async def _consume_all(services, topic: str, n: int, timeout_s: float = 20.0):
    consumer = EventConsumer(services.kafka, services.serde, [topic], group_id=None)
    await consumer.start()
    got: list = []
    try:
        deadline = asyncio.get_running_loop().time() + timeout_s
        batches = consumer.batches(timeout_ms=300)
        while len(got) < n and asyncio.get_running_loop().time() < deadline:
            got += await anext(batches)
    finally:
        await consumer.stop()
    return got


async def test_topic_creation_is_idempotent(services):
    admin = AIOKafkaAdminClient(**services.kafka.client_kwargs())
    await admin.start()
    try:
        specs = services.catalog.specs()
        assert await ensure_topics(admin, specs) == []  # created by the session fixture already
        existing = set(await admin.list_topics())
        assert {s.name for s in specs} <= existing
        described = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, services.catalog.adapters)])
        configs = {c[0]: c[1] for c in described[0].resources[0][4]}
        assert configs["cleanup.policy"] == "compact"
    finally:
        await admin.close()


async def test_every_schema_round_trips_through_the_broker(services):
    producer = await _producer(services)
    sent = {}
    try:
        for spec in services.catalog.specs():
            if spec.contract in sent:
                continue
            record_ = samples()[spec.contract] | {"event_id": f"round-trip-{spec.contract}"}
            await producer.send_and_wait(spec.name, record_, key="k")
            sent[spec.contract] = spec.name
    finally:
        await producer.stop()
    assert set(sent) == set(samples())
    for contract, topic in sent.items():
        records = await read_topics(services.kafka, [topic])
        decoded = [(await services.serde.deserialize(r.value))[1] for r in records]
        mine = [e for e in decoded if e["event_id"] == f"round-trip-{contract}"]
        assert len(mine) == 1, contract
        expected = samples()[contract] | {"event_id": f"round-trip-{contract}"}
        assert normalise(mine[0]) == normalise(expected), contract


async def test_bad_records_go_to_the_dead_letter_topic_and_the_stage_goes_on(services, run_prefix):
    topic = services.catalog.requests
    producer = await _producer(services)
    good = samples()["InferenceRequest"] | {"request_id": "after-bad", "correlation_id": "after-bad"}
    schema_id = services.serde.schema_id(topic)
    valid_bytes = services.serde.serialize(topic, good)
    bad_values = [
        b"not avro at all",                   # bad magic byte
        frame(987654, b"\x02x"),              # unknown schema id
        valid_bytes[:12],                     # truncated body
        frame(schema_id, b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff"),  # invalid varint
    ]
    try:
        for value in bad_values:
            await (await producer.send_raw(topic, value, key=b"user-x", partition=0))
        await producer.send_and_wait(topic, good, key="user-x")
        handled: list[str] = []
        consumer = EventConsumer(services.kafka, services.serde, [topic], group_id=f"{run_prefix}dlq-test")
        await consumer.start()
        stop = asyncio.Event()

        async def handle(item):
            handled.append(item.event["request_id"])
            if item.event["request_id"] == "after-bad":
                stop.set()

        dlq = DeadLetters(producer, services.catalog.dlq("router"), "router")
        await asyncio.wait_for(run_stage(consumer, dlq, handle, StageConfig("dlq-test"), stop), 30)
        await consumer.stop()
    finally:
        await producer.stop()
    assert "after-bad" in handled
    letters = [item for item in await _consume_all(services, services.catalog.dlq("router"), 5)
               if item.event["origin_topic"] == topic]
    reasons = [item.event["reason"] for item in letters]
    assert len(letters) == 4, reasons
    assert any("magic byte" in r for r in reasons)
    assert any("unknown schema id 987654" in r for r in reasons)
    assert sum("undecodable" in r for r in reasons) == 2
    assert {item.event["origin_value"] for item in letters} == set(bad_values)
    assert all(item.event["origin_topic"] == topic for item in letters)


async def test_record_then_replay_gives_identical_records(services, tmp_path):
    source = services.catalog.rewards
    producer = await _producer(services)
    try:
        for i in range(12):
            reward = samples()["Reward"] | {"request_id": f"r{i}", "reward": i / 10}
            await producer.send_and_wait(source, reward, key=f"r{i}", headers=[("x-test", b"1")])
        path = tmp_path / "rewards.avro"
        count = await record(services.kafka, services.registry, [source], path)
        assert count >= 12
        recording = load_recording(path)
        replay_prefix = "replayed."
        admin = AIOKafkaAdminClient(**services.kafka.client_kwargs())
        await admin.start()
        await ensure_topics(admin, [services.catalog.spec(source).__class__(
            replay_prefix + source, "Reward", "request_id", 3)])
        await admin.close()
        sent = await replay(recording, producer, services.registry, prefix=replay_prefix)
        assert sent == count
    finally:
        await producer.stop()
    original = await read_topics(services.kafka, [source])
    replayed = await read_topics(services.kafka, [replay_prefix + source])
    assert len(replayed) == len(original)
    for a, b in zip(original, replayed, strict=True):
        assert (a.partition, a.key, a.value, a.timestamp) == (b.partition, b.key, b.value, b.timestamp)
        assert [h for h in a.headers] == [h for h in b.headers]


async def test_trace_context_crosses_a_produce_consume_hop(services):
    from opentelemetry import trace

    from streams.tracing import consumer_span, tracer
    from tests.conftest import SPANS as exporter

    exporter.clear()
    topic = services.catalog.rollouts
    producer = await _producer(services)
    try:
        with tracer().start_as_current_span("client request") as root:
            await producer.send_and_wait(topic, samples()["Rollout"] | {"request_id": "traced"}, key="traced",
                                         span=True)
            trace_id = root.get_span_context().trace_id
    finally:
        await producer.stop()
    got = [item for item in await _consume_all(services, topic, 2) if item.event["request_id"] == "traced"]
    with consumer_span(topic, got[0].headers, got[0].record.partition, got[0].record.offset) as span:
        assert span.get_span_context().trace_id == trace_id
    spans = {s.name: s for s in exporter.get_finished_spans()}
    parent = spans[f"process {topic}"].parent
    assert parent is not None
    assert parent.span_id == spans[f"send {topic}"].context.span_id
    assert spans[f"send {topic}"].kind == trace.SpanKind.PRODUCER


async def test_migrations_apply_twice_and_refuse_edits(postgres, tmp_path):
    import asyncpg

    from core.errors import FatalError
    from infra.db import MIGRATIONS_DIR, migrate

    admin = await asyncpg.connect(postgres.url.replace("/flywheel", "/postgres"))
    name = f"mig_{tmp_path.name[-8:].lower().replace('-', '_')}"
    await admin.execute(f"CREATE DATABASE {name}")
    try:
        conn = await asyncpg.connect(postgres.url.replace("/flywheel", f"/{name}"))
        first = await migrate(conn)
        assert first == [p.name for p in sorted(MIGRATIONS_DIR.glob("*.sql"))]
        assert await migrate(conn) == []
        edited = tmp_path / "migrations"
        edited.mkdir()
        for path in MIGRATIONS_DIR.glob("*.sql"):
            (edited / path.name).write_text(path.read_text())
        (edited / "0001_schema_registry.sql").write_text(
            (edited / "0001_schema_registry.sql").read_text() + "\n-- edited\n")
        with pytest.raises(FatalError, match="must not be edited"):
            await migrate(conn, edited)
        await conn.close()
    finally:
        await admin.execute(f"DROP DATABASE {name} WITH (FORCE)")
        await admin.close()


async def test_postgres_registry_is_durable_and_enforces_compatibility(services):
    contract = load_contracts()["Reward"]
    subject = f"{services.catalog.prefix}registry-test-value"
    first = PostgresRegistry(services.pool)
    schema_id = await first.register(subject, contract.schema)
    again = PostgresRegistry(services.pool)  # a second process: no cache
    assert await again.register(subject, contract.schema) == schema_id
    assert await again.schema_by_id(schema_id) == contract.canonical
    breaking = dict(contract.schema, fields=[*contract.schema["fields"], {"name": "w", "type": "int"}])
    with pytest.raises(IncompatibleSchemaError):
        await again.register(subject, breaking)
    compatible = dict(contract.schema,
                      fields=[*contract.schema["fields"], {"name": "w", "type": "int", "default": 0}])
    assert await again.register(subject, compatible) != schema_id
    assert len(await again.versions(subject)) == 2


def test_kafka_cli_reports_a_running_broker_with_its_version(kafka_broker):
    out = subprocess.run([sys.executable, "-m", "flywheel.cli", "kafka", "status"], env=flywheel_env(),
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    assert "running: apache broker 3.9.1" in out.stdout


async def test_broker_restart_keeps_acknowledged_records(services, kafka_broker):
    topic = services.catalog.rewards
    producer = await _producer(services)
    try:
        for i in range(20):
            await producer.send_and_wait(topic, samples()["Reward"] | {"request_id": f"durable-{i}"},
                                         key=f"durable-{i}")
    finally:
        await producer.stop()
    kafka_broker.kill()  # SIGKILL: no controlled shutdown
    kafka_broker.start("apache")
    consumer = AIOKafkaConsumer(topic, **services.kafka.client_kwargs(), group_id=None,
                                auto_offset_reset="earliest")
    await consumer.start()
    try:
        seen: set[str] = set()
        deadline = asyncio.get_running_loop().time() + 30
        while len(seen) < 20 and asyncio.get_running_loop().time() < deadline:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                for r in records:
                    _, event = await services.serde.deserialize(r.value)
                    if event["request_id"].startswith("durable-"):
                        seen.add(event["request_id"])
    finally:
        await consumer.stop()
    assert seen == {f"durable-{i}" for i in range(20)}


async def test_readers_never_see_a_final_of_an_aborted_transaction(services):
    """The post-pause read flake, root cause: the client read read_uncommitted, so it could answer
    with a worker's final whose transaction then aborted (the worker re-answers it later, and a
    read_committed check right after the answers finds it missing). Every EventConsumer now reads
    committed events only, whatever it was told about the broker (none of these pass capabilities)."""
    from flywheel.client import FlywheelClient

    topic = services.catalog.responses
    client = FlywheelClient(services)
    await client.start()
    doomed = EventProducer(services.kafka, services.serde, services.capabilities,
                           transactional_id=f"{services.catalog.prefix}abort-test")
    await doomed.start()
    try:
        request = samples()["InferenceRequest"] | {"request_id": "req-abort", "correlation_id": "req-abort"}
        pending = await client.publish_request(request)
        final = samples()["InferenceResponse"] | {"request_id": "req-abort", "correlation_id": "req-abort",
                                                  "user_id": request["user_id"], "text": "from an aborted txn"}
        await doomed.raw.begin_transaction()
        await (await doomed.send(topic, final, key="req-abort"))  # appended to the log and acknowledged
        await asyncio.sleep(1.0)  # long enough for a read_uncommitted reader to hand it out
        await doomed.raw.abort_transaction()
        await asyncio.sleep(1.0)
        assert not pending.final.done(), "the client answered with a final of an aborted transaction"
        async with doomed.raw.transaction():
            await doomed.send(topic, final | {"text": "committed"}, key="req-abort")
        answer = await asyncio.wait_for(pending.final, 30)
        assert answer["text"] == "committed"
        seen = [item.event["text"] for item in await _consume_all(services, topic, 10, timeout_s=5)
                if item.event and item.event["request_id"] == "req-abort"]
        assert seen == ["committed"]
        in_log = [(await services.serde.deserialize(r.value))[1]["text"]
                  for r in await read_topics(services.kafka, [topic], committed_only=False)]
        assert "from an aborted txn" in in_log  # it was in the log all along, only never committed
    finally:
        await doomed.stop()
        await client.close()


async def test_typed_events_through_the_broker(services):
    """Typed events in and out: same bytes on the topic as the dict path, typed on the way back."""
    import msgspec

    from streams.contracts import Feedback

    topic = services.catalog.feedback
    record = samples()["Feedback"] | {"event_id": "evt-typed", "request_id": "req-typed"}
    event = msgspec.convert(normalise(record), Feedback)
    producer = await _producer(services)
    try:
        await producer.send_and_wait(topic, event, key=event.user_id)
        await producer.send_and_wait(topic, record, key=record["user_id"])
    finally:
        await producer.stop()
    values = [r.value for r in await read_topics(services.kafka, [topic])
              if (await services.serde.deserialize(r.value))[1]["event_id"] == "evt-typed"]
    assert len(values) == 2 and values[0] == values[1]  # the typed and the dict path wrote the same bytes
    consumer = EventConsumer(services.kafka, services.serde, [topic], group_id=None, typed=True)
    await consumer.start()
    try:
        got: list = []
        batches = consumer.batches(timeout_ms=300)
        deadline = asyncio.get_running_loop().time() + 20
        while asyncio.get_running_loop().time() < deadline and sum(
                1 for item in got if item.typed is not None and item.typed.event_id == "evt-typed") < 2:
            got += await anext(batches)
    finally:
        await consumer.stop()
    typed = [item.typed for item in got if item.typed is not None and item.typed.event_id == "evt-typed"]
    assert typed == [event, event] and all(item.event is None for item in got)
