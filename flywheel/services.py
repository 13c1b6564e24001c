"""Start the local services a command needs, unless external ones are configured."""

from __future__ import annotations

import logging

from flywheel.embedded_pg import EmbeddedPostgres
from flywheel.localkafka import BrokerState, LocalKafka
from flywheel.settings import Settings

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


def stop_local_services(settings: Settings) -> None:
    if not settings.kafka_bootstrap:
        LocalKafka(settings.home, settings.kafka_port, settings.kafka_controller_port).stop()
    if settings.database_url is None:
        EmbeddedPostgres(settings.home, settings.postgres_port).stop()
