"""Avro serde in the Confluent wire format, with a dict path and a typed path.

    byte 0      magic byte 0x00
    bytes 1-4   schema id, big-endian int32 (from the registry)
    bytes 5-    Avro binary body (schemaless), written with that schema

Any Kafka tool that knows the Confluent format (kcat, Kafka Connect, ksqlDB, Karapace's REST
proxy) can read our topics. The framing (``frame``/``unframe``) is pure and tested byte for byte;
:class:`AvroSerde` adds the registry and schema resolution: a record written with an older
(or newer) compatible schema is read into the reader's current schema.

Two paths over the same bytes, so handlers can move from dicts to typed events one at a time:

* dicts: ``serialize(topic, dict)`` / ``deserialize(data) -> (schema id, dict)``;
* typed events (``streams/contracts.py``): ``serialize(topic, event)`` /
  ``deserialize_event(data) -> Event``.

Timestamps (Avro ``timestamp-millis``: ``event_time``, ``deadline``) decode on both paths to the
epoch-millisecond ``int`` that is on the wire (fastavro used to build an aware ``datetime`` per
timestamp, about a third of a record's decode time; ``streams.events.event_time_ms`` and
``core.slo`` accept either). Writers may pass an int or a ``datetime``.

Bodies go through :mod:`streams.codec` (cavro, byte-identical to fastavro and about twice as
fast). Decoding is synchronous once a schema id is known: :meth:`AvroSerde.prefetch` resolves the
unknown ids of a whole batch in one pass, then :meth:`AvroSerde.decode` /
:meth:`AvroSerde.decode_event` run without awaiting anything (``EventConsumer`` does this).
"""

from __future__ import annotations

import io
import json
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import fastavro
import msgspec
from fastavro.validation import validate

from core.errors import SerializationError, ValidationError
from streams.codec import ENCODE_ERRORS, BodyCodec, CodecName, make_codec
from streams.contracts import RECORD_TYPES, Event
from streams.registry import SchemaRegistry, subject_for
from streams.schemas import Contract

MAGIC_BYTE = 0
HEADER = struct.Struct(">bI")
_BUILTINS = (bytes, bytearray, memoryview)  # kept as they are by msgspec.to_builtins (Avro bytes)


def frame(schema_id: int, body: bytes) -> bytes:
    """Prefix an Avro body with the magic byte and the schema id."""
    if not 0 <= schema_id < 2**31:
        raise ValueError(f"schema id {schema_id} out of range")
    return HEADER.pack(MAGIC_BYTE, schema_id) + body


def unframe(data: bytes | None) -> tuple[int, memoryview]:
    """Split wire bytes into (schema id, Avro body); SerializationError if not our format."""
    if data is None:
        raise SerializationError("record has no value (tombstone) where an event was expected")
    if len(data) < HEADER.size:
        raise SerializationError(f"record of {len(data)} bytes is shorter than the 5-byte header")
    magic, schema_id = HEADER.unpack_from(data)
    if magic != MAGIC_BYTE:
        raise SerializationError(f"unknown magic byte {magic} (expected 0)")
    return schema_id, memoryview(data)[HEADER.size:]


def encode_body(parsed_schema: Any, record: dict[str, Any]) -> bytes:
    """fastavro's encoding of ``record`` (the reference the faster codec is checked against)."""
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, parsed_schema, record)
    return buf.getvalue()


def decode_body(body: bytes | memoryview, writer: Any, reader: Any | None = None) -> dict[str, Any]:
    buf = io.BytesIO(body)
    record = fastavro.schemaless_reader(buf, writer, reader)
    if not isinstance(record, dict):
        raise SerializationError(f"expected an Avro record, decoded a {type(record).__name__}")
    if buf.tell() != len(body):
        raise SerializationError(f"{len(body) - buf.tell()} trailing bytes after the Avro record")
    return record


def full_name(schema: dict[str, Any]) -> str:
    name = str(schema.get("name", ""))
    namespace = schema.get("namespace")
    return name if "." in name or not namespace else f"{namespace}.{name}"


@dataclass
class _Writing:
    schema_id: int
    contract: Contract
    full_name: str
    dicts: BodyCodec
    typed: BodyCodec


class _Reading:
    """How to decode bodies written with one schema id (codecs built on first use)."""

    def __init__(self, serde: AvroSerde, writer: dict[str, Any]) -> None:
        self.serde = serde
        self.writer = writer
        self.full_name = full_name(writer)
        self._dicts: BodyCodec | None = None
        self.event_type = RECORD_TYPES.get(self.full_name)

    def _codec(self, logical_types: bool) -> BodyCodec:
        reader = self.serde._readers.get(self.full_name)
        try:
            return make_codec(self.writer, reader if reader != self.writer else None,
                              logical_types=logical_types, prefer=self.serde.codec)
        except Exception as exc:  # unparsable, or not resolvable into our reader schema
            raise SerializationError(f"cannot read {self.full_name or 'a non-record schema'}: "
                                     f"{type(exc).__name__}: {exc}") from exc

    @property
    def dicts(self) -> BodyCodec:
        """The body codec of both paths (timestamps as epoch-ms ints)."""
        if self._dicts is None:
            self._dicts = self._codec(logical_types=False)
        return self._dicts

    @property
    def typed(self) -> BodyCodec:
        return self.dicts


class AvroSerde:
    """Serialise events for topics and deserialise any registered schema id.

    ``bind(topic, contract)`` registers the contract under the topic's subject once (at start);
    afterwards ``serialize`` is synchronous. Decoding an id seen before is synchronous too; an
    unknown id needs one registry round trip (``prefetch``/``deserialize``), then it is cached
    forever (ids are immutable).
    """

    def __init__(self, registry: SchemaRegistry, validate_on_write: bool = False,
                 codec: CodecName = "cavro") -> None:
        self.registry = registry
        self.validate_on_write = validate_on_write
        self.codec: CodecName = codec
        self._writers: dict[str, _Writing] = {}
        self._by_id: dict[int, _Reading] = {}
        self._readers: dict[str, dict[str, Any]] = {}  # record full name -> reader schema
        self._codecs: dict[tuple[str, bool], BodyCodec] = {}  # (canonical schema, logical types) -> codec
        # Why the last prefetch could not resolve an id (asked again at the next prefetch: an id
        # unknown now may be registered later).
        self._unresolved: dict[int, str] = {}

    def _writer_codec(self, contract: Contract, logical_types: bool) -> BodyCodec:
        key = (contract.canonical, logical_types)
        codec = self._codecs.get(key)
        if codec is None:
            codec = self._codecs[key] = make_codec(contract.schema, logical_types=logical_types, prefer=self.codec)
        return codec

    async def bind(self, topic: str, contract: Contract) -> int:
        schema_id = await self.registry.register(subject_for(topic), contract.schema)
        name = full_name(contract.schema)
        self._readers[name] = contract.schema
        # One codec writes both paths: the bytes do not depend on the logical types.
        codec = self._writer_codec(contract, False)
        self._writers[topic] = _Writing(schema_id, contract, name, codec, codec)
        if schema_id not in self._by_id:
            self._by_id[schema_id] = _Reading(self, contract.schema)
        return schema_id

    def schema_id(self, topic: str) -> int:
        return self._writing(topic).schema_id

    def codec_of(self, topic: str) -> str:
        """Which codec writes ``topic`` ("cavro" or "fastavro")."""
        return self._writing(topic).dicts.name

    def _writing(self, topic: str) -> _Writing:
        try:
            return self._writers[topic]
        except KeyError:
            raise KeyError(f"topic {topic!r} is not bound to a contract; call bind() at start") from None

    def serialize(self, topic: str, record: dict[str, Any] | Event) -> bytes:
        """Wire bytes of ``record`` (a dict or a typed event of the topic's contract)."""
        writing = self._writing(topic)
        name = writing.contract.name
        if isinstance(record, Event):
            if writing.full_name != record.AVRO_NAME:
                raise ValidationError(f"a {type(record).__name__} cannot go to {topic!r}, whose contract is {name}")
            try:
                return frame(writing.schema_id,
                             writing.typed.encode(msgspec.to_builtins(record, builtin_types=_BUILTINS)))
            except ENCODE_ERRORS as exc:
                raise ValidationError(f"cannot encode {name}: {exc}") from exc
        if self.validate_on_write:
            try:
                validate(record, writing.contract.parsed, raise_errors=True)
            except fastavro.validation.ValidationError as exc:
                raise ValidationError(f"{name} does not match its schema: {exc}") from exc
        try:
            return frame(writing.schema_id, writing.dicts.encode(record))
        except ENCODE_ERRORS as exc:
            raise ValidationError(f"cannot encode {name}: {exc}") from exc

    # -- decoding ----------------------------------------------------------------------------------
    async def prefetch(self, values: Iterable[bytes | None]) -> None:
        """Resolve every schema id in ``values`` not seen yet (one registry call per new id).

        Unreadable values and unknown ids are left for ``decode`` to report per record."""
        known = self._by_id
        for value in values:
            # Hot loop over a whole batch: a cheap header peek; full checks happen in decode.
            if value is None or len(value) < HEADER.size or value[0] != MAGIC_BYTE:
                continue
            schema_id = HEADER.unpack_from(value)[1]
            if schema_id not in known:
                try:
                    await self._resolve(schema_id)
                except SerializationError as exc:
                    self._unresolved[schema_id] = str(exc)
                    continue
                self._unresolved.pop(schema_id, None)

    async def _resolve(self, schema_id: int) -> _Reading:
        text = await self.registry.schema_by_id(schema_id)
        try:
            writer = json.loads(text)
        except ValueError as exc:  # a registry returning garbage is a bad record, not a crash
            raise SerializationError(f"schema id {schema_id} is not valid JSON: {exc}") from exc
        if not isinstance(writer, dict) or writer.get("type") != "record":
            raise SerializationError(f"schema id {schema_id} is not an Avro record schema")
        reading = self._by_id[schema_id] = _Reading(self, writer)
        return reading

    def _reading(self, data: bytes | None) -> tuple[int, memoryview, _Reading]:
        if data is not None and len(data) >= HEADER.size and data[0] == MAGIC_BYTE:  # hot path
            schema_id = HEADER.unpack_from(data)[1]
            body = memoryview(data)[HEADER.size:]
        else:
            schema_id, body = unframe(data)  # raises the precise SerializationError
        reading = self._by_id.get(schema_id)
        if reading is None:
            raise SerializationError(self._unresolved.get(schema_id)
                                     or f"schema id {schema_id} is not resolved (unknown id, or not prefetched)")
        return schema_id, body, reading

    @staticmethod
    def schema_id_of(data: bytes | None) -> int:
        return unframe(data)[0]

    def decode(self, data: bytes | None) -> tuple[int, dict[str, Any]]:
        """(schema id, dict) of wire bytes whose id is already known (see ``prefetch``)."""
        schema_id, body, reading = self._reading(data)
        try:
            record = reading.dicts.decode(body)
        except SerializationError:
            raise
        except Exception as exc:  # codecs raise many types on corrupt input
            raise SerializationError(f"undecodable Avro body for schema id {schema_id}: "
                                     f"{type(exc).__name__}: {exc}") from exc
        if not isinstance(record, dict):
            raise SerializationError(f"expected an Avro record, decoded a {type(record).__name__}")
        return schema_id, record

    def decode_event(self, data: bytes | None) -> Event:
        """The typed event in wire bytes whose id is already known (see ``prefetch``)."""
        return self.decode_typed(data)[1]

    def decode_typed(self, data: bytes | None) -> tuple[int, Event]:
        """(schema id, typed event) of wire bytes whose id is already known (see ``prefetch``)."""
        schema_id, body, reading = self._reading(data)
        event_type = reading.event_type
        if event_type is None or not issubclass(event_type, Event):
            raise SerializationError(f"schema id {schema_id} ({reading.full_name}) has no event class")
        try:
            record = reading.typed.decode(body)
        except SerializationError:
            raise
        except Exception as exc:
            raise SerializationError(f"undecodable Avro body for schema id {schema_id}: "
                                     f"{type(exc).__name__}: {exc}") from exc
        try:
            return schema_id, msgspec.convert(record, event_type)
        except msgspec.ValidationError as exc:  # the writer's schema resolved, its values do not fit
            raise SerializationError(f"{reading.full_name} does not fit {event_type.__name__}: {exc}") from exc

    async def deserialize(self, data: bytes | None) -> tuple[int, dict[str, Any]]:
        schema_id, _ = unframe(data)
        if schema_id not in self._by_id:
            await self._resolve(schema_id)
        return self.decode(data)

    async def deserialize_event(self, data: bytes | None) -> Event:
        schema_id, _ = unframe(data)
        if schema_id not in self._by_id:
            await self._resolve(schema_id)
        return self.decode_event(data)
