"""Shared plumbing for Flywheel's faust agents.

Each agent process is one faust App whose agents read raw bytes and decode them with our Avro
serde (so undecodable records become dead letters instead of crashing the stream), call a pure
core function, and produce through faust's producer. On Apache Kafka the app runs with
``processing_guarantee="exactly_once"``: each source partition has a transactional producer, so
an agent's outputs (dead letters included) and its consumer offsets commit atomically. On Tansu
it runs at-least-once and outputs are deduplicated downstream by event id.

The process connects to its services (Postgres pool, registry, serde) *before* faust starts, on
the same uvloop event loop, so agents never see a half-initialised service.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

import faust
import uvloop
from mode import Worker

from core.errors import DeadLetterError
from infra.connect import Services, connect
from infra.metrics import start_metrics
from infra.runtime import setup_logging
from infra.settings import Settings
from streams.consumed import Consumed
from streams.dlq import DeadLetters
from streams.kafka import KafkaConfig, encode_key
from streams.tracing import inject_headers, process_context, setup_tracing

log = logging.getLogger(__name__)


def _credentials(config: KafkaConfig) -> Any:
    if config.sasl_mechanism:
        password = config.sasl_password.get_secret_value() if config.sasl_password else ""
        return faust.SASLCredentials(
            username=config.sasl_username, password=password, mechanism=config.sasl_mechanism,
            ssl_context=config.ssl_context() if "SSL" in config.security_protocol else None)
    context = config.ssl_context()
    if context is not None:
        return faust.SSLCredentials(context)
    return None


def make_app(name: str, services: Services, **options: Any) -> faust.App:
    """A faust App wired to the same Kafka as ``services``, exactly-once where supported."""
    config = services.kafka
    guarantee = "exactly_once" if services.capabilities.transactions else "at_least_once"
    datadir = services.settings.home.resolve() / "faust" / name
    datadir.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        f"{services.settings.topic_prefix}flywheel-{name}",
        broker=[f"kafka://{host}" for host in config.bootstrap.split(",")],
        broker_credentials=_credentials(config),
        processing_guarantee=guarantee,
        value_serializer="raw",
        key_serializer="raw",
        store="memory://",
        web_enabled=False,
        topic_allow_declare=False,
        topic_disable_leader=True,
        consumer_auto_offset_reset="earliest",
        broker_commit_interval=0.5,
        producer_acks=-1,
        datadir=str(datadir),
        **options,
    )
    log.info("%s agent: %s processing", name, guarantee.replace("_", "-"))
    return app


def raw_topic(app: faust.App, name: str) -> Any:
    return app.topic(name, value_type=bytes, key_type=bytes, value_serializer="raw", key_serializer="raw")


class FaustSink:
    """Produce Avro events through the faust app's producer (inside its transactions)."""

    def __init__(self, app: faust.App, services: Services) -> None:
        self.app = app
        self.serde = services.serde
        self._topics: dict[str, Any] = {}

    def _topic(self, name: str) -> Any:
        if name not in self._topics:
            self._topics[name] = raw_topic(self.app, name)
        return self._topics[name]

    async def send(self, topic: str, record: dict[str, Any], key: str | bytes | None = None,
                   headers: list[tuple[str, bytes]] | None = None) -> Any:
        value = self.serde.serialize(topic, record)
        return await self._topic(topic).send(key=encode_key(key), value=value,
                                             headers=inject_headers(headers))

    async def send_and_wait(self, topic: str, record: dict[str, Any], key: str | bytes | None = None,
                            headers: list[tuple[str, bytes]] | None = None, span: bool = False) -> Any:
        return await self.send(topic, record, key, headers)


async def decode(services: Services, event: Any, dlq: DeadLetters) -> dict[str, Any] | None:
    """Decode a faust event's value; on failure publish a dead letter and return None."""
    message = event.message
    try:
        _, record = await services.serde.deserialize(message.value)
        return record
    except DeadLetterError as exc:
        await dlq.publish(Consumed.of(message), exc)
        return None


async def process_each(stream: Any, services: Services, dlq: DeadLetters,
                       handle: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
    """The body of a decode -> core -> produce agent: each record is decoded (undecodable bytes
    become dead letters), handled inside its trace context, and dead-lettered with the reason if
    ``handle`` raises :class:`DeadLetterError`. Any other error propagates (see ``exits_on_error``)."""
    async for event in stream.events():
        message = event.message
        record = await decode(services, event, dlq)
        if record is None:
            continue
        with process_context(message.topic, message.headers, message.partition, message.offset):
            try:
                await handle(record)
            except DeadLetterError as exc:
                await dlq.publish(Consumed.of(message), exc, record)


def exits_on_error(body: Callable[[Any], Awaitable[None]]) -> Callable[[Any], Awaitable[None]]:
    """Wrap an agent body: an unexpected error ends the process (exit 70) for the supervisor to
    restart it. faust would otherwise ack the failing events and restart the agent, and an event
    must never be acknowledged without its outputs; dying aborts the open transaction instead."""

    @functools.wraps(body)
    async def guarded(stream: Any) -> None:
        try:
            await body(stream)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.critical("agent %s failed; exiting for a restart", body.__name__, exc_info=True)
            logging.shutdown()
            os._exit(70)

    return guarded


def crash_process_on_error(task: asyncio.Task[Any]) -> None:
    """Done-callback for an agent's background task: a task that dies of an unexpected error
    takes the process down (exit 70) so the supervisor restarts it, instead of the agent carrying
    on without, say, its feedback reader."""
    if task.cancelled() or task.exception() is None:
        return
    log.critical("background task %s failed; exiting for a restart", task.get_name(), exc_info=task.exception())
    logging.shutdown()
    os._exit(70)


def run_agent_process(name: str, settings: Settings, build: Callable[[Services], faust.App],
                      on_stop: Callable[[Services], Any] | None = None) -> int:
    """Connect, build the app, and run it on uvloop until SIGINT/SIGTERM."""
    setup_logging(settings.log_level)
    setup_tracing(f"flywheel-{name}", settings.otlp_endpoint, sample_ratio=settings.trace_sample_ratio)
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    services = loop.run_until_complete(connect(settings, f"flywheel-{name}"))
    start_metrics(settings.metrics_port, name, settings.metrics_host)
    app = build(services)
    worker = Worker(app, loglevel=settings.log_level, loop=loop, quiet=True, override_logging=False)
    try:
        worker.execute_from_commandline()
    finally:
        if on_stop is not None:
            loop.run_until_complete(on_stop(services))
        if not loop.is_closed():
            loop.run_until_complete(services.close())
    return 0

