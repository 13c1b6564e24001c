"""Start the local services a command needs, unless external ones are configured."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from infra.embedded_pg import EmbeddedPostgres
from infra.localkafka import BrokerState, LocalKafka
from infra.settings import Settings

log = logging.getLogger(__name__)


def ensure_local_services(settings: Settings) -> tuple[BrokerState | None, str | None]:
    """Start the local broker and embedded Postgres if needed; return what was started."""
    broker = None
    if not settings.kafka_bootstrap:
        broker = LocalKafka(settings.home, settings.kafka_port, settings.kafka_controller_port).start(
            settings.kafka_broker)
    pg_url = None
    if settings.database_url is None:
        pg_url = EmbeddedPostgres(settings.home, settings.postgres_port).start()
    return broker, pg_url


def _local(settings: Settings) -> list[LocalKafka | EmbeddedPostgres]:
    """The local services this configuration uses (none for external Kafka and Postgres)."""
    out: list[LocalKafka | EmbeddedPostgres] = []
    if not settings.kafka_bootstrap:
        out.append(LocalKafka(settings.home, settings.kafka_port, settings.kafka_controller_port))
    if settings.database_url is None:
        out.append(EmbeddedPostgres(settings.home, settings.postgres_port))
    return out


def stop_local_services(settings: Settings) -> None:
    for service in _local(settings):
        service.stop()


@contextlib.contextmanager
def local_services(settings: Settings) -> Iterator[None]:
    """Run the block with the local services up; stop afterwards only those it had to start."""
    started_here = [s for s in _local(settings) if not s.status().running]
    ensure_local_services(settings)
    try:
        yield
    finally:
        for service in started_here:
            service.stop()
