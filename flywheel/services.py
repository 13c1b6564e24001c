"""Start the local services a command needs, unless external ones are configured."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

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


def running_local_services(settings: Settings) -> tuple[bool, bool]:
    """Whether the local broker and the embedded Postgres are running now (False when external)."""
    broker = not settings.kafka_bootstrap and LocalKafka(
        settings.home, settings.kafka_port, settings.kafka_controller_port).status().running
    postgres = settings.database_url is None and EmbeddedPostgres(
        settings.home, settings.postgres_port).status().running
    return bool(broker), bool(postgres)


def stop_started_services(settings: Settings, before: tuple[bool, bool]) -> None:
    """Stop the local services that were not running at ``before`` (what this process started)."""
    if not settings.kafka_bootstrap and not before[0]:
        LocalKafka(settings.home, settings.kafka_port, settings.kafka_controller_port).stop()
    if settings.database_url is None and not before[1]:
        EmbeddedPostgres(settings.home, settings.postgres_port).stop()


@contextlib.contextmanager
def local_services(settings: Settings) -> Iterator[None]:
    """Run the block with the local services up; stop afterwards only those it had to start."""
    before = running_local_services(settings)
    ensure_local_services(settings)
    try:
        yield
    finally:
        stop_started_services(settings, before)
