"""The compatibility set on the Tansu fallback broker (memory only, no transactions).

Flywheel must detect Tansu's limits and run at-least-once on it: topics, every schema through
the broker, dead letters, and record/replay.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest

from infra.connect import connect
from infra.localkafka import LocalKafka
from streams.dlq import DeadLetters
from streams.kafka import EventConsumer, EventProducer, probe_capabilities
from streams.replay import read_topics
from streams.stage import StageConfig, run_stage
from tests.conftest import TEST_HOME, TEST_KAFKA_PORT
from tests.factories import samples
from tests.integration.conftest import make_settings
from tests.unit.streams.test_contracts import normalise

pytestmark = [pytest.mark.integration, pytest.mark.tansu]
TANSU_PORT = TEST_KAFKA_PORT + 2  # inside each engineer's own port range (the session's broker has +0, +1)


@pytest.fixture(scope="module")
def tansu():
    broker = LocalKafka(TEST_HOME / "tansu", TANSU_PORT, TANSU_PORT + 1)
    broker.stop()
    broker.start("tansu")
    yield broker
    broker.stop()


@pytest.fixture(scope="module")
async def tansu_services(tansu, postgres):
    settings = make_settings(home=TEST_HOME / "tansu", kafka_port=TANSU_PORT, kafka_broker="tansu",
                             topic_prefix=f"tansu{uuid.uuid4().hex[:6]}.")
    svc = await connect(settings, "tansu-tests", run_migrations=True, create_topics=True)
    yield svc
    await svc.close()


async def test_tansu_limits_are_detected(tansu_services):
    caps = await probe_capabilities(tansu_services.kafka)
    assert not caps.transactions and not caps.idempotence
    assert caps.guarantee.startswith("at-least-once")
    assert tansu.__name__  # the fixture module is the one that started Tansu


async def test_every_schema_round_trips_on_tansu(tansu_services):
    svc = tansu_services
    producer = EventProducer(svc.kafka, svc.serde, svc.capabilities)
    assert not producer.transactional
    await producer.start()
    topics = {}
    try:
        for spec in svc.catalog.specs():
            if spec.contract not in topics:
                await producer.send_and_wait(spec.name, samples()[spec.contract], key="k")
                topics[spec.contract] = spec.name
    finally:
        await producer.stop()
    for contract, topic in topics.items():
        records = await read_topics(svc.kafka, [topic])
        _, event = await svc.serde.deserialize(records[0].value)
        assert normalise(event) == normalise(samples()[contract])


async def test_dead_letters_on_tansu(tansu_services):
    svc = tansu_services
    topic = svc.catalog.feedback
    producer = EventProducer(svc.kafka, svc.serde, svc.capabilities)
    await producer.start()
    try:
        await (await producer.send_raw(topic, b"\x00\x00\x00\x03\xe7garbage", key=b"u"))
        await producer.send_and_wait(topic, samples()["Feedback"] | {"request_id": "ok"}, key="u")
        consumer = EventConsumer(svc.kafka, svc.serde, [topic], group_id=f"{svc.catalog.prefix}g")
        await consumer.start()
        stop = asyncio.Event()
        handled = []

        async def handle(item):
            handled.append(item.event["request_id"])
            if item.event["request_id"] == "ok":
                stop.set()

        await asyncio.wait_for(run_stage(consumer, DeadLetters(producer, svc.catalog.dlq("router"), "router"),
                                         handle, StageConfig("tansu"), stop), 60)
        await consumer.stop()
    finally:
        await producer.stop()
    assert handled[-1] == "ok"
    letters = await read_topics(svc.kafka, [svc.catalog.dlq("router")])
    reasons = [(await svc.serde.deserialize(r.value))[1]["reason"] for r in letters]
    assert any("unknown schema id 999" in r for r in reasons)
