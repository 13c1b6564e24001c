"""Typed events: the generated classes match the schemas, and the typed path writes the dict path's bytes."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import typing

import msgspec
import pytest

from core.errors import SerializationError, ValidationError
from streams import contracts
from streams.contracts import EVENT_TYPES, RECORD_TYPES, Event, InferenceRequest, Reward
from streams.contracts_gen import TARGET, render
from streams.registry import InMemoryRegistry
from streams.schemas import SCHEMA_DIR, expand_schemas, load_contracts
from streams.serde import AvroSerde, frame
from tests.factories import samples

TOP_LEVEL = sorted(EVENT_TYPES)


def epoch_ms(record):
    """The dict path decodes timestamp-millis to datetimes; the typed path keeps epoch ms."""
    if isinstance(record, dict):
        return {k: epoch_ms(v) for k, v in record.items()}
    if isinstance(record, list):
        return [epoch_ms(v) for v in record]
    if hasattr(record, "timestamp"):
        return int(record.timestamp() * 1000)
    return record


def test_generated_module_is_up_to_date():
    """If this fails, a .avsc file changed: run `python -m streams.contracts_gen` and commit the result."""
    assert TARGET.read_text() == render(), "streams/contracts.py is stale: run python -m streams.contracts_gen"


def test_the_check_command_reports_a_stale_module(tmp_path, monkeypatch):
    monkeypatch.setattr("streams.contracts_gen.TARGET", tmp_path / "contracts.py")
    from streams.contracts_gen import main

    assert main(["--check"]) == 1
    assert main([]) == 0
    assert main(["--check"]) == 0


def test_every_contract_with_an_envelope_has_an_event_class():
    assert set(EVENT_TYPES) == {"InferenceRequest", "InferenceResponse", "ResponseChunk", "RoutingDecision",
                                "Feedback", "Rollout", "Reward", "AdapterPublished", "ModelPublished",
                                "WorkerHeartbeat", "DeadLetter"}
    for name, cls in EVENT_TYPES.items():
        assert issubclass(cls, Event) and f"dev.flywheel.{name}" == cls.AVRO_NAME
    for name in ("ChatMessage", "SamplingParams", "CandidateScore", "PairwisePreference", "ImplicitSignal", "Header"):
        assert f"dev.flywheel.{name}" in RECORD_TYPES


@pytest.mark.parametrize("name", sorted(load_contracts()))
def test_class_fields_are_the_schema_fields_with_the_same_defaults(name):
    schema = load_contracts()[name].schema
    cls = RECORD_TYPES[f"dev.flywheel.{name}"]
    fields = msgspec.structs.fields(cls)
    assert [f.name for f in fields] == [f["name"] for f in schema["fields"]]
    for avro_field, field in zip(schema["fields"], fields, strict=True):
        if "default" not in avro_field:
            assert field.required, (name, field.name)
        elif isinstance(avro_field["default"], (list, dict)):
            assert field.default_factory() == avro_field["default"]
        else:
            assert field.default == avro_field["default"], (name, field.name)


@pytest.mark.parametrize("name", TOP_LEVEL)
async def test_typed_path_writes_the_dict_path_bytes_and_reads_them_back(name):
    serde = AvroSerde(InMemoryRegistry())
    topic = f"t.{name}"
    await serde.bind(topic, load_contracts()[name])
    record = samples()[name]
    wire = serde.serialize(topic, record)
    event = await serde.deserialize_event(wire)
    assert type(event) is EVENT_TYPES[name]
    assert serde.serialize(topic, event) == wire
    assert msgspec.to_builtins(event, builtin_types=(bytes,)) == epoch_ms(record)
    built = msgspec.convert(epoch_ms(record), EVENT_TYPES[name])  # a handler building the event itself
    assert serde.serialize(topic, built) == wire


async def test_golden_bytes_of_a_typed_reward():
    """The same golden bytes as the dict path's test in test_contracts.py."""
    serde = AvroSerde(InMemoryRegistry())
    await serde.bind("t.rewards", load_contracts()["Reward"])
    reward = Reward(event_id="evt-req-1", correlation_id="req-1", tenant_id="tenant-a", user_id="user-1",
                    event_time=1764000000000, request_id="req-1", reward=0.75, source="feedback",
                    feedback_id="evt-fb")
    assert serde.serialize("t.rewards", reward) == bytes.fromhex(
        "000000000112" "6576742d7265712d31" "0a7265712d31" "1074656e616e742d61" "0c757365722d31"
        "80a0bfe9d6660a" "7265712d31" "000000000000e83f" "00" "020c6576742d6662")


async def test_an_event_for_another_contract_is_refused():
    serde = AvroSerde(InMemoryRegistry())
    await serde.bind("t.rewards", load_contracts()["Reward"])
    request = msgspec.convert(epoch_ms(samples()["InferenceRequest"]), InferenceRequest)
    with pytest.raises(ValidationError, match="cannot go to"):
        serde.serialize("t.rewards", request)


async def test_a_wrong_value_in_a_typed_event_is_a_validation_error():
    serde = AvroSerde(InMemoryRegistry())
    await serde.bind("t.rewards", load_contracts()["Reward"])
    bad = Reward(event_id="e", correlation_id="c", tenant_id="t", user_id="u", event_time=1, request_id="r",
                 reward="lots", source="feedback")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="Reward"):
        serde.serialize("t.rewards", bad)


async def test_typed_decode_reads_an_older_writer_into_the_current_class():
    registry = InMemoryRegistry()
    old = copy.deepcopy(load_contracts()["Reward"].schema)
    old["fields"] = [f for f in old["fields"] if f["name"] != "feedback_id"]
    old_writer = AvroSerde(registry)
    import fastavro

    from streams.schemas import Contract

    await old_writer.bind("t.rewards", Contract("Reward", old, fastavro.parse_schema(copy.deepcopy(old))))
    record = {k: v for k, v in samples()["Reward"].items() if k != "feedback_id"}
    wire = old_writer.serialize("t.rewards", record)
    reader = AvroSerde(registry)
    await reader.bind("t.rewards", load_contracts()["Reward"])
    event = await reader.deserialize_event(wire)
    assert isinstance(event, Reward) and event.feedback_id is None and event.reward == 0.75


async def test_typed_decode_of_garbage_is_a_serialization_error():
    serde = AvroSerde(InMemoryRegistry())
    schema_id = await serde.bind("t.rewards", load_contracts()["Reward"])
    with pytest.raises(SerializationError):
        await serde.deserialize_event(frame(schema_id, b"\x02"))
    with pytest.raises(SerializationError, match="unknown schema id"):
        await serde.deserialize_event(frame(schema_id + 100, b""))


async def test_batched_decode_resolves_unknown_ids_once_then_decodes_synchronously():
    registry = InMemoryRegistry()
    writer = AvroSerde(registry)
    await writer.bind("t.rewards", load_contracts()["Reward"])
    wires = [writer.serialize("t.rewards", samples()["Reward"]) for _ in range(3)] + [b"junk", None]
    reader = AvroSerde(registry)  # has not bound anything: every id is unknown to it
    with pytest.raises(SerializationError, match="not resolved"):
        reader.decode(wires[0])
    await reader.prefetch(wires)
    assert [reader.decode_event(w) for w in wires[:3]] == [await writer.deserialize_event(wires[0])] * 3


def test_regeneration_follows_a_new_optional_field(tmp_path):
    """What another change to a schema looks like: the class gains the field, with its default."""
    raw = {p.stem: json.loads(p.read_text()) for p in SCHEMA_DIR.glob("*.avsc")}
    raw["Feedback"]["fields"].append({"name": "model_version", "type": ["null", "string"], "default": None,
                                      "doc": "Version of the model that answered."})
    import fastavro

    from streams.schemas import Contract

    changed = {n: Contract(n, s, fastavro.parse_schema(copy.deepcopy(s))) for n, s in expand_schemas(raw).items()}
    text = render(changed)
    assert "    model_version: str | None = None\n" in text.split("class Feedback(")[1].split("\nclass ")[0]
    module = tmp_path / "contracts_changed.py"
    module.write_text(text)
    out = subprocess.run([sys.executable, "-c", "import contracts_changed as c; "
                          "print(c.Feedback(event_id='e', correlation_id='c', tenant_id='t', user_id='u', "
                          "event_time=1, request_id='r', kind='thumbs').model_version)"],
                         cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "None"


def test_the_generator_refuses_what_it_cannot_map():
    from streams.schemas import Contract

    fixed = {"type": "record", "name": "F", "namespace": "dev.flywheel",
             "fields": [{"name": "h", "type": {"type": "fixed", "name": "Hash", "size": 16}}]}
    with pytest.raises(ValueError, match="fixed"):
        render({"F": Contract("F", fixed, None)})
    keyword = {"type": "record", "name": "K", "namespace": "dev.flywheel", "fields": [{"name": "from", "type": "int"}]}
    with pytest.raises(ValueError, match="usable Python attribute"):
        render({"K": Contract("K", keyword, None)})


def test_module_exports_the_enums_as_literals():
    assert typing.get_args(contracts.SloClass) == ("interactive", "standard", "batch")
