"""Avro binary bodies, encoded and decoded by the fastest codec that writes the same bytes.

Two implementations of one small interface (:class:`BodyCodec`):

* :class:`CavroCodec` - ``cavro`` (Cython): encodes about 2x and decodes about 2.5x faster than
  fastavro on our contracts (``bench/pipeline.py`` reports both).
* :class:`FastavroCodec` - fastavro, the reference.

Both write byte-identical Avro for every contract in ``schemas/`` - unions, enums, maps,
arrays, float32 specials and timestamp-millis included; ``tests/unit/streams/test_codec.py``
checks that on generated records of every contract, so a schema change that hits a difference
fails there. Where cavro cannot take a schema (it refuses to parse it) :func:`make_codec` falls
back to fastavro; ``prefer="fastavro"`` forces the reference everywhere.

``logical_types=False`` decodes timestamp-millis as the epoch-millisecond ``int`` that is on
the wire (the typed events' representation) instead of an aware ``datetime`` (the dict path's,
kept as it was). The bytes do not change: a logical type only annotates a ``long``.
"""

from __future__ import annotations

import copy
import io
from typing import Any, Literal, Protocol

import fastavro

from core.errors import SerializationError

try:  # a compiled wheel: absent on a platform without one, then fastavro serves alone
    import cavro
except ImportError:  # pragma: no cover - every supported platform has the wheel
    cavro = None

CodecName = Literal["cavro", "fastavro"]

# Exceptions an encoder raises for a value that does not fit its schema.
ENCODE_ERRORS: tuple[type[BaseException], ...] = (ValueError, TypeError, KeyError, AttributeError, OverflowError)
if cavro is not None:
    ENCODE_ERRORS += (cavro.CavroException,)


class BodyCodec(Protocol):
    """Encode a record to an Avro body and decode one back (schema resolution included)."""

    name: CodecName

    def encode(self, record: Any) -> bytes: ...

    def decode(self, body: bytes | memoryview) -> Any:
        """The record in ``body``; SerializationError for trailing bytes or a corrupt body."""
        ...


def strip_logical_types(schema: Any) -> Any:
    """A copy of ``schema`` without ``logicalType`` annotations (same bytes, plain values)."""
    if isinstance(schema, list):
        return [strip_logical_types(s) for s in schema]
    if isinstance(schema, dict):
        return {k: strip_logical_types(v) for k, v in schema.items() if k != "logicalType"}
    return schema


class FastavroCodec:
    name: CodecName = "fastavro"

    def __init__(self, writer: dict[str, Any], reader: dict[str, Any] | None = None,
                 logical_types: bool = True) -> None:
        if not logical_types:
            writer = strip_logical_types(writer)
            reader = strip_logical_types(reader) if reader is not None else None
        self._writer = fastavro.parse_schema(copy.deepcopy(writer))
        self._reader = fastavro.parse_schema(copy.deepcopy(reader)) if reader is not None else None

    def encode(self, record: Any) -> bytes:
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, self._writer, record)
        return buf.getvalue()

    def decode(self, body: bytes | memoryview) -> Any:
        buf = io.BytesIO(body)
        record = fastavro.schemaless_reader(buf, self._writer, self._reader)
        if buf.tell() != len(body):
            raise SerializationError(f"{len(body) - buf.tell()} trailing bytes after the Avro record")
        return record


# cavro's in-memory decoder stops after the record and cannot say where; a file reader can, at
# about +60 % per record. Instead each body is decoded inside a wrapper record whose second field
# is a sentinel long appended to the body: it reads back only if the body was consumed exactly.
_SENTINEL_VALUE = 0x2A2A2A2A
_SENTINEL = b"\xd4\xa8\xd1\xa2\x05"  # zigzag varint of _SENTINEL_VALUE


def _framed(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "record", "name": "SentinelFramed", "namespace": "dev.flywheel.codec",
            "fields": [{"name": "body", "type": copy.deepcopy(schema)}, {"name": "end", "type": "long"}]}


class CavroCodec:
    name: CodecName = "cavro"

    def __init__(self, writer: dict[str, Any], reader: dict[str, Any] | None = None,
                 logical_types: bool = True) -> None:
        if cavro is None:
            raise ImportError("cavro is not installed")
        options: dict[str, Any] = {"record_decodes_to_dict": True,
                                   # fastavro writes an out-of-range float32 as +-inf; so do we
                                   "float_out_of_range_inf": True}
        if not logical_types:
            options["logical_types"] = ()
        self._encoder = cavro.Schema(copy.deepcopy(writer), **options)
        framed_writer = cavro.Schema(_framed(writer), **options)
        self._decoder: Any = framed_writer
        if reader is not None:
            self._decoder = cavro.Schema(_framed(reader), **options).reader_for_writer(framed_writer)

    def encode(self, record: Any) -> bytes:
        return bytes(self._encoder.binary_encode(record))

    def decode(self, body: bytes | memoryview) -> Any:
        framed = self._decoder.binary_decode(b"".join((body, _SENTINEL)))  # one copy, memoryview or bytes
        if framed["end"] != _SENTINEL_VALUE:
            raise SerializationError("trailing bytes after the Avro record (or a body shorter than its schema)")
        return framed["body"]


def make_codec(writer: dict[str, Any], reader: dict[str, Any] | None = None, *, logical_types: bool = True,
               prefer: CodecName = "cavro") -> BodyCodec:
    """The preferred codec for ``writer`` (read into ``reader`` when given), else fastavro."""
    if prefer == "cavro" and cavro is not None:
        try:
            return CavroCodec(writer, reader, logical_types)
        except Exception:  # cavro refuses this schema (or the resolution): fastavro takes it
            pass
    return FastavroCodec(writer, reader, logical_types)
