"""Security: SASL/SCRAM over TLS to the local Apache Kafka, secrets that never reach logs or reprs,
and per-user isolation at the gateway."""

from __future__ import annotations

import logging
import uuid

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaConnectionError, KafkaError
from pydantic import SecretStr

from infra.localkafka import LocalKafka, SecurityListener
from infra.settings import Settings
from infra.tls import make_tls_material
from streams.kafka import KafkaConfig, probe_capabilities
from streams.topics import TopicSpec, ensure_topics
from tests.conftest import TEST_HOME, TEST_KAFKA_PORT

pytestmark = [pytest.mark.integration, pytest.mark.security]
# Inside each engineer's own port range (the session's broker holds +0 and +1).
PLAIN_PORT, SECURE_PORT = TEST_KAFKA_PORT + 4, TEST_KAFKA_PORT + 6
USER, PASSWORD = "flywheel-admin", "s3cret-Scram-pass"
STORE_PASSWORD = "changeit-tls"


@pytest.fixture(scope="module")
def secure_broker():
    home = TEST_HOME / "secure"
    keystore, truststore, pem = make_tls_material(home / "tls", STORE_PASSWORD)
    broker = LocalKafka(home, PLAIN_PORT, PLAIN_PORT + 1, security=SecurityListener(
        SECURE_PORT, keystore, truststore, STORE_PASSWORD, USER, PASSWORD))
    broker.stop()
    broker.start("apache")
    yield pem
    broker.stop()


def secure_config(pem, password: str = PASSWORD) -> KafkaConfig:
    return KafkaConfig(bootstrap=f"127.0.0.1:{SECURE_PORT}", security_protocol="SASL_SSL",
                       sasl_mechanism="SCRAM-SHA-256", sasl_username=USER, sasl_password=SecretStr(password),
                       ssl_cafile=pem)


async def test_scram_over_tls_round_trip(secure_broker):
    config = secure_config(secure_broker)
    caps = await probe_capabilities(config)
    assert caps.transactions  # the secure listener is the same Apache broker
    topic = f"secure.topic.{uuid.uuid4().hex[:8]}"  # the broker's data outlives a test run
    admin = AIOKafkaAdminClient(**config.client_kwargs())
    await admin.start()
    try:
        await ensure_topics(admin, [TopicSpec(topic, "Reward", "request_id", 1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(**config.client_kwargs(), acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(topic, b"over tls", key=b"k")
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(topic, **config.client_kwargs(), group_id=None,
                                auto_offset_reset="earliest")
    await consumer.start()
    try:
        got = await consumer.getmany(timeout_ms=10_000)
        assert [r.value for rs in got.values() for r in rs] == [b"over tls"]
    finally:
        await consumer.stop()


async def test_wrong_password_is_refused(secure_broker):
    producer = AIOKafkaProducer(**secure_config(secure_broker, "wrong-password").client_kwargs())
    with pytest.raises((KafkaError, KafkaConnectionError)):
        await producer.start()
    await producer.stop()


async def test_plaintext_client_cannot_use_the_secure_listener(secure_broker):
    config = KafkaConfig(bootstrap=f"127.0.0.1:{SECURE_PORT}", client_id="plain")
    producer = AIOKafkaProducer(**config.client_kwargs(), request_timeout_ms=3000)
    with pytest.raises((KafkaError, KafkaConnectionError)):
        await producer.start()
    await producer.stop()


async def test_secrets_never_reach_reprs_or_logs(secure_broker, caplog):
    settings = Settings(kafka_sasl_password=SecretStr(PASSWORD), database_url=SecretStr("postgresql://u:dbpw@h/db"),
                        gateway_api_keys=SecretStr('{"sk-alice-key": "alice"}'))
    for text in (repr(settings), str(settings), settings.model_dump_json(), repr(secure_config(secure_broker))):
        assert PASSWORD not in text and "dbpw" not in text and "sk-alice-key" not in text
    caplog.set_level(logging.DEBUG)
    with pytest.raises(Exception):  # noqa: B017 - any failure; we only look at what was logged
        await probe_capabilities(secure_config(secure_broker, "a-wrong-" + PASSWORD))
    await probe_capabilities(secure_config(secure_broker))
    assert PASSWORD not in caplog.text
