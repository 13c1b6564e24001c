"""Real services for integration tests: Apache Kafka (KRaft) and the embedded Postgres.

The test command starts both before pytest (and stops them after); when they are not running
(pytest run directly), the session starts them here and stops what it started.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from infra.connect import Services, connect
from infra.embedded_pg import EmbeddedPostgres
from infra.localkafka import LocalKafka
from infra.settings import Settings
from tests.conftest import TEST_HOME, TEST_KAFKA_PORT, TEST_PG_PORT


def make_settings(**overrides: Any) -> Settings:
    base: dict[str, Any] = dict(home=TEST_HOME, kafka_port=TEST_KAFKA_PORT, kafka_controller_port=TEST_KAFKA_PORT + 1,
                                postgres_port=TEST_PG_PORT, kafka_broker="apache", topic_partitions=3)
    base.update(overrides)
    return Settings(**base)


@pytest.fixture(scope="session")
def kafka_broker():
    broker = LocalKafka(TEST_HOME, TEST_KAFKA_PORT, TEST_KAFKA_PORT + 1)
    started = not broker.status().running
    state = broker.start("apache")
    yield broker
    if started:
        broker.stop()
    del state


@pytest.fixture(scope="session")
def postgres():
    server = EmbeddedPostgres(TEST_HOME, TEST_PG_PORT)
    started = not server.status().running
    server.start()
    yield server
    if started:
        server.stop()


@pytest.fixture(scope="session")
def run_prefix() -> str:
    """A topic prefix unique to this test session, so runs never see each other's records."""
    return f"it{uuid.uuid4().hex[:8]}."


@pytest.fixture(scope="session")
def settings(kafka_broker, postgres, run_prefix) -> Settings:
    return make_settings(topic_prefix=run_prefix)


@pytest.fixture(scope="session")
async def services(settings) -> AsyncIterator[Services]:
    svc = await connect(settings, "tests", run_migrations=True, create_topics=True)
    yield svc
    await svc.close()
