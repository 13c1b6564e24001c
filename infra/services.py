"""Start the local services a command needs, unless external ones are configured, and stop
exactly those it started (a broker or Postgres that was already running is left alone)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from infra.embedded_pg import EmbeddedPostgres
from infra.localkafka import LocalKafka
from infra.settings import Settings

log = logging.getLogger(__name__)

LocalService = LocalKafka | EmbeddedPostgres


def _local(settings: Settings) -> list[LocalService]:
    """The local services this configuration uses (none for external Kafka and Postgres)."""
    out: list[LocalService] = []
    if not settings.kafka_bootstrap:
        out.append(LocalKafka(settings.home, settings.kafka_port, settings.kafka_controller_port))
    if settings.database_url is None:
        out.append(EmbeddedPostgres(settings.home, settings.postgres_port))
    return out


def ensure_local_services(settings: Settings, started: list[LocalService] | None = None) -> list[LocalService]:
    """Start the local broker and embedded Postgres where needed; return the ones started here.

    Each service is appended to ``started`` as soon as it runs, so a caller that passes its own
    list can stop what did start even when a later one fails (say, its port is taken).
    """
    started = [] if started is None else started
    for service in _local(settings):
        if service.status().running:
            continue
        if isinstance(service, LocalKafka):
            service.start(settings.kafka_broker)
        else:
            service.start()
        started.append(service)
    return started


def stop_services(services: list[LocalService]) -> None:
    """Stop ``services`` in reverse start order (Postgres before the broker it was started after)."""
    for service in reversed(services):
        try:
            service.stop()
            log.info("stopped %s", describe(service))
        except Exception as exc:  # keep stopping the others; say what is left running
            log.error("could not stop %s: %s", describe(service), exc)


def describe(service: LocalService) -> str:
    if isinstance(service, LocalKafka):
        return f"the local Kafka broker on port {service.port}"
    return f"the embedded PostgreSQL on port {service.port}"


def stop_local_services(settings: Settings) -> None:
    for service in _local(settings):
        service.stop()


@contextlib.contextmanager
def local_services(settings: Settings) -> Iterator[None]:
    """Run the block with the local services up; stop afterwards only those it had to start."""
    started: list[LocalService] = []
    try:
        ensure_local_services(settings, started)
        yield
    finally:
        stop_services(started)
