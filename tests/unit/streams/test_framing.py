"""The Confluent wire format, byte for byte."""

import pytest

from core.errors import SerializationError
from streams.serde import decode_body, encode_body, frame, unframe


def test_frame_layout_is_magic_byte_then_big_endian_id():
    assert frame(7, b"\x02ab") == b"\x00\x00\x00\x00\x07\x02ab"
    assert frame(0x01020304, b"") == b"\x00\x01\x02\x03\x04"


def test_unframe_round_trips():
    schema_id, body = unframe(frame(123456, b"xyz"))
    assert schema_id == 123456
    assert bytes(body) == b"xyz"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "shorter than the 5-byte header"),
        (b"\x00\x00\x01", "shorter than the 5-byte header"),
        (b"\x01\x00\x00\x00\x01abc", "unknown magic byte 1"),
        (None, "tombstone"),
    ],
)
def test_unframe_rejects_foreign_bytes(data, message):
    with pytest.raises(SerializationError, match=message):
        unframe(data)


def test_frame_rejects_out_of_range_id():
    with pytest.raises(ValueError):
        frame(-1, b"")


def test_avro_body_golden_bytes():
    schema = {"type": "record", "name": "T", "fields": [
        {"name": "s", "type": "string"}, {"name": "n", "type": "long"},
        {"name": "o", "type": ["null", "double"]}]}
    import fastavro
    parsed = fastavro.parse_schema(schema)
    # "hi" -> zigzag len 2 = 0x04, 'h' 'i'; 150 -> zigzag 300 = 0xac 0x02; union branch 0 (null) = 0x00
    assert encode_body(parsed, {"s": "hi", "n": 150, "o": None}) == b"\x04hi\xac\x02\x00"
    assert decode_body(b"\x04hi\xac\x02\x00", parsed) == {"s": "hi", "n": 150, "o": None}


def test_trailing_bytes_are_an_error():
    import fastavro
    parsed = fastavro.parse_schema({"type": "record", "name": "T", "fields": [{"name": "n", "type": "int"}]})
    with pytest.raises(SerializationError, match="trailing"):
        decode_body(b"\x02\x00", parsed)
