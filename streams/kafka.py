"""Kafka clients for Flywheel events: connection config, broker capabilities, producer, consumer.

Thin wrappers over aiokafka that add our Avro serde, trace-context headers and typed errors.
The same code runs on Apache Kafka (idempotent producer, transactions) and on the Tansu
fallback (neither: at-least-once, and consumers dedupe by event id).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from aiokafka.client import AIOKafkaClient
from aiokafka.errors import KafkaConnectionError, KafkaError
from aiokafka.helpers import create_ssl_context
from aiokafka.partitioner import murmur2
from aiokafka.protocol.admin import ApiVersionRequest
from aiokafka.protocol.transaction import InitProducerIdRequest
from pydantic import SecretStr

from core.errors import DeadLetterError, RetriableError
from streams.consumed import Consumed
from streams.contracts import Event
from streams.serde import AvroSerde
from streams.tracing import inject_headers, producer_span

log = logging.getLogger(__name__)

END_TXN_API_KEY = 26
# COORDINATOR_LOAD_IN_PROGRESS, COORDINATOR_NOT_AVAILABLE, NOT_COORDINATOR: retry, not "unsupported".
_COORDINATOR_NOT_READY = {14, 15, 16}
INIT_PRODUCER_ID_API_KEY = 22


@dataclass(frozen=True)
class KafkaConfig:
    """Where and how to connect. Built from settings at the entry point."""

    bootstrap: str
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = field(default=None, repr=False)
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    ssl_check_hostname: bool = True
    client_id: str = "flywheel"

    def ssl_context(self) -> ssl.SSLContext | None:
        if "SSL" not in self.security_protocol:
            return None
        context = create_ssl_context(
            cafile=str(self.ssl_cafile) if self.ssl_cafile else None,
            certfile=str(self.ssl_certfile) if self.ssl_certfile else None,
            keyfile=str(self.ssl_keyfile) if self.ssl_keyfile else None,
        )
        context.check_hostname = self.ssl_check_hostname
        return context

    def client_kwargs(self) -> dict[str, Any]:
        """Keyword arguments shared by aiokafka's producer, consumer and admin client."""
        kwargs: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap,
            "security_protocol": self.security_protocol,
            "client_id": self.client_id,
        }
        context = self.ssl_context()
        if context is not None:
            kwargs["ssl_context"] = context
        if self.sasl_mechanism:
            kwargs["sasl_mechanism"] = self.sasl_mechanism
            kwargs["sasl_plain_username"] = self.sasl_username
            kwargs["sasl_plain_password"] = (
                self.sasl_password.get_secret_value() if self.sasl_password else None
            )
        return kwargs


@dataclass(frozen=True)
class BrokerCapabilities:
    transactions: bool
    idempotence: bool
    api_versions: dict[int, tuple[int, int]] = field(default_factory=dict, repr=False)

    @property
    def guarantee(self) -> str:
        return "exactly-once (transactions)" if self.transactions else "at-least-once (dedupe by event id)"


async def probe_capabilities(config: KafkaConfig) -> BrokerCapabilities:
    """Ask the broker what it can really do.

    Advertised API versions are not enough: Tansu advertises InitProducerId and EndTxn but
    answers aiokafka's InitProducerId v0 with UNKNOWN_SERVER_ERROR. So we request a producer id
    the way aiokafka's idempotent producer would (no transactional id: harmless on any broker);
    idempotence needs it to succeed, and transactions additionally need EndTxn.
    """
    client = AIOKafkaClient(**config.client_kwargs())
    try:
        await client.bootstrap()
        node_id = next(iter(client.cluster.brokers())).nodeId
        response = await client.send(node_id, ApiVersionRequest())
        versions = {key: (lo, hi) for key, lo, hi in response.api_versions}
        idempotence = False
        if INIT_PRODUCER_ID_API_KEY in versions:
            for _ in range(50):  # a freshly started broker may still be loading its coordinator
                pid = await client.send(node_id, InitProducerIdRequest(transactional_id=None,
                                                                       transaction_timeout_ms=60_000))
                if pid.error_code not in _COORDINATOR_NOT_READY:
                    break
                await asyncio.sleep(0.2)
            idempotence = pid.error_code == 0 and pid.producer_id >= 0
    except (KafkaConnectionError, KafkaError, OSError) as exc:
        raise RetriableError(f"cannot reach Kafka at {config.bootstrap}: {exc}") from exc
    finally:
        await client.close()
    transactions = idempotence and END_TXN_API_KEY in versions
    caps = BrokerCapabilities(transactions=transactions, idempotence=idempotence, api_versions=versions)
    if not transactions:
        log.warning("broker at %s has no %s: running at-least-once with deduplication by event id",
                    config.bootstrap, "transactions" if idempotence else "idempotent producer or transactions")
    return caps


def encode_key(key: str | bytes | None) -> bytes | None:
    if key is None or isinstance(key, bytes):
        return key
    return key.encode()


class EventProducer:
    """Produce Avro events with trace context; idempotent where the broker supports it."""

    def __init__(self, config: KafkaConfig, serde: AvroSerde, capabilities: BrokerCapabilities,
                 transactional_id: str | None = None, linger_ms: int = 5, **extra: Any) -> None:
        self.serde = serde
        self.capabilities = capabilities
        kwargs = config.client_kwargs()
        kwargs.update(acks="all", linger_ms=linger_ms, max_batch_size=1 << 20, **extra)
        if capabilities.idempotence:
            kwargs["enable_idempotence"] = True
        if transactional_id and capabilities.transactions:
            kwargs["transactional_id"] = transactional_id
        self.transactional = "transactional_id" in kwargs
        self.raw = AIOKafkaProducer(**kwargs)
        self._partition_cache: dict[tuple[bytes, int], int] = {}
        self._round_robin = 0

    async def start(self) -> None:
        try:
            await self.raw.start()
        except (KafkaConnectionError, OSError) as exc:
            raise RetriableError(f"producer cannot connect: {exc}") from exc

    async def stop(self) -> None:
        await self.raw.stop()

    def encode(self, topic: str, record: dict[str, Any] | Event) -> bytes:
        return self.serde.serialize(topic, record)

    async def send(self, topic: str, record: dict[str, Any] | Event, key: str | bytes | None = None,
                   headers: list[tuple[str, bytes]] | None = None, partition: int | None = None,
                   span: bool = False) -> Any:
        """Serialise, inject the current trace context and hand to the batcher.

        Returns a future of the broker's ack. The current span (the stage's processing span, or
        the client's request span) is the record's creation context; ``span=True`` adds a
        PRODUCER span of its own (worth it at trace roots, not in hot loops).
        """
        value = self.serde.serialize(topic, record)
        if not span:
            return await self.raw.send(topic, value, key=encode_key(key), partition=partition,
                                       headers=inject_headers(headers))
        event_id = record.event_id if isinstance(record, Event) else record.get("event_id", "")
        with producer_span(topic, {"messaging.message.id": event_id}):
            return await self.raw.send(topic, value, key=encode_key(key), partition=partition,
                                       headers=inject_headers(headers))

    async def send_and_wait(self, topic: str, record: dict[str, Any] | Event, key: str | bytes | None = None,
                            headers: list[tuple[str, bytes]] | None = None, span: bool = False) -> Any:
        future = await self.send(topic, record, key, headers, span=span)
        return await future

    def partition_for(self, topic: str, key: bytes | None, n_partitions: int) -> int:
        """Index of ``key``'s partition among the topic's sorted partitions: Java-compatible
        murmur2, exactly what aiokafka's (and Kafka's) default partitioner picks,
        memoised per key: keys (user ids, request ids) repeat, and murmur2 is pure Python."""
        if key is None:
            self._round_robin = (self._round_robin + 1) % n_partitions
            return self._round_robin
        cache_key = (key, n_partitions)
        found = self._partition_cache.get(cache_key)
        if found is None:
            if len(self._partition_cache) > 200_000:
                self._partition_cache.clear()
            found = (murmur2(key) & 0x7FFFFFFF) % n_partitions
            self._partition_cache[cache_key] = found
        return found

    async def send_many(self, topic: str,
                        items: Sequence[tuple[str | bytes | None, dict[str, Any] | Event,
                                              list[tuple[str, bytes]] | None]],
                        ) -> list[Any]:
        """Produce several events at once; returns the futures of the broker's acks.

        Records are serialised and appended straight into per-partition record batches (one
        future per batch instead of per record), which is how a stage that consumes a batch
        should produce its outputs. Keys are partitioned exactly as ``send`` would.
        """
        partitions = sorted(await self.raw.partitions_for(topic))
        n = len(partitions)
        builders: dict[int, Any] = {}
        futures: list[Any] = []
        for key, record, headers in items:
            key_bytes = encode_key(key)
            value = self.serde.serialize(topic, record)
            hdrs = headers if headers and any(k == "traceparent" for k, _ in headers) else inject_headers(headers)
            partition = partitions[self.partition_for(topic, key_bytes, n)]
            builder = builders.get(partition)
            if builder is None:
                builder = builders[partition] = self.raw.create_batch()
            if builder.append(timestamp=None, key=key_bytes, value=value, headers=hdrs) is None:
                futures.append(await self.raw.send_batch(builder, topic, partition=partition))
                builder = builders[partition] = self.raw.create_batch()
                builder.append(timestamp=None, key=key_bytes, value=value, headers=hdrs)
        for partition, builder in builders.items():
            futures.append(await self.raw.send_batch(builder, topic, partition=partition))
        return futures

    def transaction(self) -> Any:
        """A transaction (transactional producers only): everything sent inside commits or aborts together."""
        return self.raw.transaction()

    async def send_offsets_to_transaction(self, offsets: dict[TopicPartition, tuple[int, str]], group_id: str) -> None:
        """Commit consumer offsets (with metadata) in the open transaction."""
        await self.raw.send_offsets_to_transaction(offsets, group_id)

    async def send_raw(self, topic: str, value: bytes | None, key: bytes | None = None,
                       headers: list[tuple[str, bytes]] | None = None, partition: int | None = None,
                       timestamp_ms: int | None = None) -> Any:
        """Produce bytes as they are (replay, DLQ re-drive)."""
        return await self.raw.send(topic, value, key=key, headers=headers or [], partition=partition,
                                   timestamp_ms=timestamp_ms)


@dataclass(slots=True)
class Received:
    """One consumed record: raw bytes and, if it decoded, the event (``event`` as a dict, or
    ``typed`` as a typed event when the consumer was made with ``typed=True``)."""

    record: ConsumerRecord[bytes, bytes]
    event: dict[str, Any] | None = None
    schema_id: int | None = None
    error: DeadLetterError | None = None
    typed: Event | None = None

    @property
    def headers(self) -> list[tuple[str, bytes]]:
        return list(self.record.headers or [])

    @property
    def tp(self) -> TopicPartition:
        return TopicPartition(self.record.topic, self.record.partition)

    @property
    def consumed(self) -> Consumed:
        """The record as it was on the broker (what a dead letter keeps)."""
        return Consumed.of(self.record)


class EventConsumer:
    """Consume and decode events; undecodable records come back with ``error`` set (never raised).

    Reads are ``read_committed`` unless the broker is known to have no transactions (see
    ``__init__``). Decoding is batched: the schema ids of a fetched batch are resolved first (a registry call
    only for an id never seen), then every record decodes synchronously. ``typed=True`` yields
    typed events (``Received.typed``) instead of dicts (``Received.event``).
    """

    def __init__(self, config: KafkaConfig, serde: AvroSerde, topics: list[str], group_id: str | None,
                 capabilities: BrokerCapabilities | None = None, auto_offset_reset: str = "earliest",
                 typed: bool = False, **extra: Any) -> None:
        self.serde = serde
        self.typed = typed
        kwargs = config.client_kwargs()
        kwargs.update(group_id=group_id, enable_auto_commit=False, auto_offset_reset=auto_offset_reset,
                      **extra)
        # Readers see committed events only. A read_uncommitted reader can hand out a record of a
        # transaction that later aborts (a worker's final, after a broker fault), which is then
        # answered again. Only a broker known to have no transactions reads uncommitted (there is
        # nothing to abort there); an unknown broker is read as if it had them.
        if capabilities is None or capabilities.transactions:
            kwargs.setdefault("isolation_level", "read_committed")
        self.raw = AIOKafkaConsumer(*topics, **kwargs)
        self.group_id = group_id

    async def start(self) -> None:
        try:
            await self.raw.start()
        except (KafkaConnectionError, OSError) as exc:
            raise RetriableError(f"consumer cannot connect: {exc}") from exc

    async def stop(self) -> None:
        await self.raw.stop()

    def subscribe(self, topics: list[str], listener: ConsumerRebalanceListener) -> None:
        """Subscribe (before ``start``) with a listener told of every rebalance."""
        self.raw.subscribe(topics, listener=listener)

    def assignment(self) -> set[TopicPartition]:
        """The partitions this consumer owns now."""
        return set(self.raw.assignment())

    async def decode(self, record: ConsumerRecord[bytes, bytes]) -> Received:
        await self.serde.prefetch((record.value,))
        return self.decode_known(record)

    def decode_known(self, record: ConsumerRecord[bytes, bytes]) -> Received:
        """Decode a record whose schema id was prefetched (an unknown id is a dead letter)."""
        try:
            if self.typed:
                schema_id, event = self.serde.decode_typed(record.value)
                return Received(record, schema_id=schema_id, typed=event)
            schema_id, decoded = self.serde.decode(record.value)
            return Received(record, decoded, schema_id)
        except DeadLetterError as exc:
            return Received(record, error=exc)

    async def decode_batch(self, records: Sequence[ConsumerRecord[bytes, bytes]]) -> list[Received]:
        await self.serde.prefetch(r.value for r in records)
        if self.typed:
            return [self.decode_known(r) for r in records]
        decode = self.serde.decode  # the dict path inlined: this loop runs once per record
        out: list[Received] = []
        for record in records:
            try:
                schema_id, event = decode(record.value)
            except DeadLetterError as exc:
                out.append(Received(record, error=exc))
                continue
            out.append(Received(record, event, schema_id))
        return out

    async def batches(self, timeout_ms: int = 500, max_records: int = 500) -> AsyncIterator[list[Received]]:
        """Yield decoded batches (possibly empty, so callers can do periodic work)."""
        while True:
            fetched = await self.raw.getmany(timeout_ms=timeout_ms, max_records=max_records)
            records = [record for part in fetched.values() for record in part]
            yield await self.decode_batch(records) if records else []

    async def commit(self, offsets: dict[TopicPartition, int] | dict[TopicPartition, tuple[int, str]] | None = None
                     ) -> None:
        await self.raw.commit(offsets)


async def fetch_committed(config: KafkaConfig, group: str, partitions: set[TopicPartition]
                          ) -> dict[TopicPartition, tuple[int, str]]:
    """A consumer group's committed (offset, metadata) for ``partitions`` (absent: never committed)."""
    if not partitions:
        return {}
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(**config.client_kwargs())
    await admin.start()
    try:
        found = await admin.list_consumer_group_offsets(group, partitions=list(partitions))
    finally:
        await admin.close()
    return {tp: (meta.offset, meta.metadata or "") for tp, meta in found.items() if meta.offset >= 0}


async def partitions_of(config: KafkaConfig, topics: list[str], retry_s: float = 30.0) -> dict[str, list[int]]:
    """Partition ids of each topic (KeyError naming the topics that do not exist).

    A broker that was just restarted or resumed drops connections and answers metadata
    requests with errors for a few seconds: that is retried for up to ``retry_s``."""
    deadline = asyncio.get_running_loop().time() + retry_s
    while True:
        client = AIOKafkaClient(**config.client_kwargs())
        try:
            await client.bootstrap()
            cluster = await client.fetch_all_metadata()
            break
        except KafkaError as exc:
            if asyncio.get_running_loop().time() >= deadline:
                raise RetriableError(f"cannot read topic metadata from {config.bootstrap}: {exc}") from exc
            await asyncio.sleep(0.5)
        finally:
            await client.close()
    out = {t: sorted(cluster.partitions_for_topic(t) or []) for t in topics}
    missing = [t for t, parts in out.items() if not parts]
    if missing:
        raise KeyError(f"no such topics: {missing}")
    return out


async def partition_leaders(config: KafkaConfig, topics: list[str]) -> dict[TopicPartition, int]:
    """The broker (node id) leading each partition of ``topics``, from fresh metadata."""
    client = AIOKafkaClient(**config.client_kwargs())
    try:
        await client.bootstrap()
        cluster = await client.fetch_all_metadata()
    finally:
        await client.close()
    out: dict[TopicPartition, int] = {}
    for topic in topics:
        for partition in cluster.partitions_for_topic(topic) or ():
            tp = TopicPartition(topic, partition)
            leader = cluster.leader_for_partition(tp)
            if leader is not None and leader >= 0:
                out[tp] = leader
    return out
