"""Wire a process to its services from the settings: Kafka, Postgres, registry, serde, topics.

Every Flywheel process calls :func:`connect` once at start. External services are used when
configured (``FLYWHEEL_KAFKA_BOOTSTRAP``, ``FLYWHEEL_DATABASE_URL``,
``FLYWHEEL_SCHEMA_REGISTRY_URL``); otherwise the local broker and embedded Postgres under
``FLYWHEEL_HOME`` (started by ``flywheel up``, ``flywheel kafka start`` / ``flywheel db start``).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

import asyncpg
from aiokafka.admin import AIOKafkaAdminClient

from core.catalog import CATALOG
from core.errors import RetriableError
from infra.db import create_pool, migrate
from infra.embedded_pg import EmbeddedPostgres
from infra.localkafka import LocalKafka
from infra.settings import Settings
from streams.kafka import BrokerCapabilities, KafkaConfig, probe_capabilities
from streams.registry import ConfluentRegistry, PostgresRegistry, SchemaRegistry
from streams.schemas import load_contracts
from streams.serde import AvroSerde
from streams.topics import TopicCatalog, ensure_topics

log = logging.getLogger(__name__)
T = TypeVar("T")


def kafka_config(settings: Settings, client_id: str = "flywheel") -> KafkaConfig:
    bootstrap = settings.kafka_bootstrap
    if not bootstrap:
        state = LocalKafka(settings.home, settings.kafka_port, settings.kafka_controller_port).read_state()
        bootstrap = state.bootstrap if state else f"127.0.0.1:{settings.kafka_port}"
    return KafkaConfig(
        bootstrap=bootstrap,
        security_protocol=settings.kafka_security_protocol,
        sasl_mechanism=settings.kafka_sasl_mechanism,
        sasl_username=settings.kafka_sasl_username,
        sasl_password=settings.kafka_sasl_password,
        ssl_cafile=settings.kafka_ssl_cafile,
        ssl_certfile=settings.kafka_ssl_certfile,
        ssl_keyfile=settings.kafka_ssl_keyfile,
        ssl_check_hostname=settings.kafka_ssl_check_hostname,
        client_id=client_id,
    )


def replication_factor(settings: Settings) -> int:
    """Replicas per topic: ``FLYWHEEL_REPLICATION_FACTOR`` when set; otherwise what the local broker
    or cluster holds (3 on ``flywheel kafka start --brokers 3``, else 1)."""
    if "replication_factor" in settings.model_fields_set or settings.kafka_bootstrap:
        return settings.replication_factor
    return LocalKafka(settings.home, settings.kafka_port, settings.kafka_controller_port).replication


def database_url(settings: Settings) -> str:
    if settings.database_url is not None:
        return settings.database_url.get_secret_value()
    return EmbeddedPostgres(settings.home, settings.postgres_port).url


def topic_catalog(settings: Settings) -> TopicCatalog:
    return TopicCatalog(prefix=settings.topic_prefix, partitions=settings.topic_partitions,
                        models=tuple(CATALOG))


@dataclass
class Services:
    """A process's connections. ``close()`` releases them."""

    settings: Settings
    kafka: KafkaConfig
    capabilities: BrokerCapabilities
    pool: asyncpg.Pool
    registry: SchemaRegistry
    serde: AvroSerde
    catalog: TopicCatalog

    async def close(self) -> None:
        await self.registry.close()
        await self.pool.close()


async def _retry(what: str, attempt: Callable[[], Awaitable[T]], timeout_s: float) -> T:
    deadline = asyncio.get_running_loop().time() + timeout_s
    delay = 0.2
    while True:
        try:
            return await attempt()
        except RetriableError as exc:
            if asyncio.get_running_loop().time() > deadline:
                raise
            log.info("%s not ready (%s); retrying in %.1fs", what, exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)


async def connect(settings: Settings, client_id: str, *, run_migrations: bool = False,
                  create_topics: bool = False, timeout_s: float = 60.0) -> Services:
    """Connect to Kafka and Postgres (retrying while they come up), bind every topic's schema."""
    kafka = kafka_config(settings, client_id)
    caps = await _retry("Kafka", lambda: probe_capabilities(kafka), timeout_s)
    pool = await _retry("Postgres", lambda: create_pool(database_url(settings)), timeout_s)
    if run_migrations:
        async with pool.acquire() as conn:
            await migrate(conn)
        # Re-create the pool so every connection registers the pgvector type the migrations added.
        await pool.close()
        pool = await create_pool(database_url(settings))
    registry: SchemaRegistry
    if settings.schema_registry_url:
        password = settings.schema_registry_password
        registry = ConfluentRegistry(settings.schema_registry_url, settings.schema_registry_username,
                                     password.get_secret_value() if password else None)
    else:
        registry = PostgresRegistry(pool)
    catalog = topic_catalog(settings)
    if create_topics:
        admin = AIOKafkaAdminClient(**kafka.client_kwargs())
        await admin.start()
        try:
            await ensure_topics(admin, catalog.specs(), replication_factor(settings), supports_configs=True)
        finally:
            await admin.close()
    serde = AvroSerde(registry)
    contracts = load_contracts()
    for spec in catalog.specs():
        await serde.bind(spec.name, contracts[spec.contract])
    return Services(settings, kafka, caps, pool, registry, serde, catalog)


class Stoppable(Protocol):
    """A long-running stage: ``run()`` returns once ``stop`` is set."""

    stop: asyncio.Event

    async def run(self) -> None: ...


async def run_until_stopped(settings: Settings, client_id: str, build: Callable[[Services], Stoppable]) -> None:
    """Connect, build the process's stage on those services, run it until SIGINT or SIGTERM sets
    its ``stop`` event (it then finishes its batch and returns), and close the connections."""
    services = await connect(settings, client_id)
    stage = build(services)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stage.stop.set)
    try:
        await stage.run()
    finally:
        await services.close()
