"""Avro serde in the Confluent wire format.

    byte 0      magic byte 0x00
    bytes 1-4   schema id, big-endian int32 (from the registry)
    bytes 5-    Avro binary body (schemaless), written with that schema

Any Kafka tool that knows the Confluent format (kcat, Kafka Connect, ksqlDB, Karapace's REST
proxy) can read our topics. The framing (``frame``/``unframe``) is pure and tested byte for byte;
:class:`AvroSerde` adds the registry and schema resolution: a record written with an older
(or newer) compatible schema is read into the reader's current schema.
"""

from __future__ import annotations

import io
import json
import struct
from typing import Any

import fastavro
from fastavro.validation import validate

from core.errors import SerializationError, ValidationError
from streams.registry import SchemaRegistry, subject_for
from streams.schemas import Contract

MAGIC_BYTE = 0
HEADER = struct.Struct(">bI")


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


class AvroSerde:
    """Serialise events for topics and deserialise any registered schema id.

    ``bind(topic, contract)`` registers the contract under the topic's subject once (at start);
    afterwards ``serialize`` is synchronous and allocation-light. ``deserialize`` is async only
    because an unknown id may need one registry round trip (then it is cached forever).
    """

    def __init__(self, registry: SchemaRegistry, validate_on_write: bool = False) -> None:
        self.registry = registry
        self.validate_on_write = validate_on_write
        self._writers: dict[str, tuple[int, Any, Contract]] = {}
        self._parsed_by_id: dict[int, Any] = {}
        self._readers: dict[str, Any] = {}  # record full name -> parsed reader schema

    async def bind(self, topic: str, contract: Contract) -> int:
        schema_id = await self.registry.register(subject_for(topic), contract.schema)
        self._writers[topic] = (schema_id, contract.parsed, contract)
        self._parsed_by_id[schema_id] = contract.parsed
        self._readers[f"{contract.schema['namespace']}.{contract.name}"] = contract.parsed
        return schema_id

    def schema_id(self, topic: str) -> int:
        return self._writers[topic][0]

    def serialize(self, topic: str, record: dict[str, Any]) -> bytes:
        try:
            schema_id, parsed, contract = self._writers[topic]
        except KeyError:
            raise KeyError(f"topic {topic!r} is not bound to a contract; call bind() at start") from None
        if self.validate_on_write:
            try:
                validate(record, parsed, raise_errors=True)
            except fastavro.validation.ValidationError as exc:
                raise ValidationError(f"{contract.name} does not match its schema: {exc}") from exc
        try:
            return frame(schema_id, encode_body(parsed, record))
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise ValidationError(f"cannot encode {contract.name}: {exc}") from exc

    async def deserialize(self, data: bytes | None) -> tuple[int, dict[str, Any]]:
        schema_id, body = unframe(data)
        writer = self._parsed_by_id.get(schema_id)
        if writer is None:
            text = await self.registry.schema_by_id(schema_id)
            try:
                writer = fastavro.parse_schema(json.loads(text))
            except Exception as exc:  # a registry returning garbage is a bad record, not a crash
                raise SerializationError(f"schema id {schema_id} is not a valid Avro schema: {exc}") from exc
            self._parsed_by_id[schema_id] = writer
        reader = self._readers.get(writer["name"]) if isinstance(writer, dict) else None
        try:
            return schema_id, decode_body(body, writer, reader if reader is not writer else None)
        except SerializationError:
            raise
        except Exception as exc:  # fastavro raises many types on corrupt input
            raise SerializationError(f"undecodable Avro body for schema id {schema_id}: "
                                     f"{type(exc).__name__}: {exc}") from exc
