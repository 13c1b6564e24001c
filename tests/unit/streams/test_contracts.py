"""Every contract encodes and decodes; evolution follows the compatibility rules; golden bytes."""

import copy
import json

import pytest

from core.errors import IncompatibleSchemaError, SerializationError, ValidationError
from streams.registry import InMemoryRegistry
from streams.schemas import Compatibility, check_compatibility, load_contracts
from streams.serde import AvroSerde, frame
from tests.factories import samples

TOP_LEVEL = ["InferenceRequest", "RoutingDecision", "ResponseChunk", "InferenceResponse", "Feedback",
             "Rollout", "Reward", "AdapterPublished", "ModelPublished", "WorkerHeartbeat", "DeadLetter"]


def normalise(record):
    """fastavro returns timestamp-millis as aware datetimes; compare as epoch ms."""
    if isinstance(record, dict):
        return {k: normalise(v) for k, v in record.items()}
    if isinstance(record, list):
        return [normalise(v) for v in record]
    if hasattr(record, "timestamp"):
        return int(record.timestamp() * 1000)
    return record


def test_every_event_contract_has_the_envelope():
    contracts = load_contracts()
    for name in TOP_LEVEL:
        fields = {f["name"] for f in contracts[name].schema["fields"]}
        assert {"event_id", "correlation_id", "tenant_id", "user_id", "event_time"} <= fields, name


def test_expanded_schemas_are_self_contained():
    import fastavro
    for name, contract in load_contracts().items():
        fastavro.parse_schema(json.loads(contract.canonical), _write_hint=False)  # no external names needed
        assert contract.schema["namespace"] == "dev.flywheel", name


@pytest.mark.parametrize("name", TOP_LEVEL)
async def test_round_trip(name):
    serde = AvroSerde(InMemoryRegistry())
    await serde.bind(f"t.{name}", load_contracts()[name])
    record = samples()[name]
    data = serde.serialize(f"t.{name}", record)
    assert data[0] == 0
    schema_id, decoded = await serde.deserialize(data)
    assert schema_id == serde.schema_id(f"t.{name}")
    assert normalise(decoded) == normalise(record)


async def test_golden_bytes_of_a_reward():
    serde = AvroSerde(InMemoryRegistry())
    await serde.bind("t.rewards", load_contracts()["Reward"])
    data = serde.serialize("t.rewards", samples()["Reward"])
    expected = bytes.fromhex(
        "000000000112"            # magic, schema id 1, event_id len 9 ("evt-req-1")
        "6576742d7265712d31"       # "evt-req-1"
        "0a7265712d31"             # correlation_id "req-1"
        "1074656e616e742d61"       # tenant_id "tenant-a"
        "0c757365722d31"           # user_id "user-1"
        "80a0bfe9d6660a"           # event_time 1764000000000 (zigzag varint), request_id len 5
        "7265712d31"               # "req-1"
        "000000000000e83f"         # reward 0.75 (little-endian double)
        "00"                       # source enum index 0 = feedback
        "020c6576742d6662"         # feedback_id union branch 1, "evt-fb"
    )
    assert data == expected


async def test_invalid_record_is_a_validation_error():
    serde = AvroSerde(InMemoryRegistry())
    await serde.bind("t.rewards", load_contracts()["Reward"])
    bad = dict(samples()["Reward"], reward="lots")
    with pytest.raises(ValidationError):
        serde.serialize("t.rewards", bad)


async def test_unknown_schema_id_is_a_serialization_error():
    serde = AvroSerde(InMemoryRegistry())
    with pytest.raises(SerializationError, match="unknown schema id 99"):
        await serde.deserialize(frame(99, b"\x00"))


async def test_truncated_body_is_a_serialization_error():
    serde = AvroSerde(InMemoryRegistry())
    await serde.bind("t.rewards", load_contracts()["Reward"])
    data = serde.serialize("t.rewards", samples()["Reward"])
    with pytest.raises(SerializationError):
        await serde.deserialize(data[:-10])


def _with_field(schema, field):
    evolved = copy.deepcopy(schema)
    evolved["fields"].append(field)
    return evolved


async def test_backward_compatible_evolution_reads_old_data_with_new_schema():
    registry = InMemoryRegistry()
    old = load_contracts()["Reward"]
    writer = AvroSerde(registry)
    await writer.bind("t.rewards", old)
    data = writer.serialize("t.rewards", samples()["Reward"])

    new_schema = _with_field(old.schema, {"name": "weight", "type": "double", "default": 1.0})
    import fastavro

    from streams.schemas import Contract
    new = Contract("Reward", new_schema, fastavro.parse_schema(copy.deepcopy(new_schema)))
    reader = AvroSerde(registry)
    await reader.bind("t.rewards", new)  # registers version 2 (compatible)
    _, decoded = await reader.deserialize(data)  # written with v1, read into v2
    assert decoded["weight"] == 1.0
    assert decoded["reward"] == 0.75


async def test_incompatible_schema_is_refused_with_a_clear_error():
    registry = InMemoryRegistry()
    old = load_contracts()["Reward"]
    await registry.register("t.rewards-value", old.schema)
    breaking = _with_field(old.schema, {"name": "weight", "type": "double"})  # no default
    with pytest.raises(IncompatibleSchemaError, match=r"t\.rewards-value.*weight"):
        await registry.register("t.rewards-value", breaking)


def test_compatibility_levels():
    old = load_contracts()["Reward"].schema
    removed = copy.deepcopy(old)
    removed["fields"] = [f for f in removed["fields"] if f["name"] != "feedback_id"]
    added = _with_field(old, {"name": "x", "type": "int"})
    o, r, a = (json.dumps(s) for s in (old, removed, added))
    assert check_compatibility(r, [o], Compatibility.BACKWARD) == []   # drop a field: new reads old
    assert check_compatibility(a, [o], Compatibility.BACKWARD) != []   # new required field: cannot
    assert check_compatibility(a, [o], Compatibility.FORWARD) == []    # old reader ignores it
    assert check_compatibility(a, [o], Compatibility.FULL) != []
    assert check_compatibility(a, [o], Compatibility.NONE) == []
    # transitive checks every earlier version, not only the latest
    assert check_compatibility(o, [a, r], Compatibility.BACKWARD) == []
    assert check_compatibility(o, [a, r], Compatibility.FORWARD_TRANSITIVE) != []
