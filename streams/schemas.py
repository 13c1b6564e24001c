"""The Avro contracts in ``schemas/*.avsc``, loaded once, expanded and parsed.

Each ``.avsc`` file defines one named type. Files may refer to types defined in other files by
name (``"type": "InferenceRequest"``); :func:`load_contracts` resolves those references and
produces, for every type, a *self-contained* schema (each named type defined inline at its first
use). That expanded form is what we register with a schema registry, so any Kafka tool can read
our topics without knowing about our file layout.

Compatibility is checked with the Apache ``avro`` package's ``ReaderWriterCompatibilityChecker``
(the same rules as the Confluent Schema Registry), never by hand.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from enum import StrEnum
from functools import lru_cache
from pathlib import Path
from typing import Any

import avro.schema
import fastavro
from avro.compatibility import ReaderWriterCompatibilityChecker, SchemaCompatibilityType

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schemas"
NAMESPACE = "dev.flywheel"
PRIMITIVES = {"null", "boolean", "int", "long", "float", "double", "bytes", "string"}


@dataclass(frozen=True)
class Contract:
    """One event type: its name, its expanded JSON schema and fastavro's parsed form."""

    name: str
    schema: dict[str, Any]
    parsed: Any

    @property
    def canonical(self) -> str:
        """Canonical JSON text, stable for hashing and registry lookups."""
        return json.dumps(self.schema, sort_keys=True, separators=(",", ":"))


def _full_name(name: str, namespace: str | None) -> str:
    return name if "." in name or namespace is None else f"{namespace}.{name}"


def _expand(node: Any, defs: dict[str, dict[str, Any]], seen: set[str], namespace: str | None) -> Any:
    """Inline named references: the first use of a named type gets its definition, later uses its name."""
    if isinstance(node, str):
        if node in PRIMITIVES:
            return node
        full = _full_name(node, namespace)
        if full in seen:
            return full
        if full not in defs:
            raise ValueError(f"unknown Avro type {node!r}")
        return _expand(copy.deepcopy(defs[full]), defs, seen, namespace)
    if isinstance(node, list):
        return [_expand(item, defs, seen, namespace) for item in node]
    if not isinstance(node, dict):
        return node
    kind = node.get("type")
    if kind in ("record", "enum", "fixed"):
        ns = node.get("namespace", namespace)
        full = _full_name(node["name"], ns)
        seen.add(full)
        out = dict(node)
        out["name"] = full.rsplit(".", 1)[-1]
        out["namespace"] = full.rsplit(".", 1)[0] if "." in full else ns
        if kind == "record":
            out["fields"] = [
                {**field, "type": _expand(field["type"], defs, seen, ns)} for field in node["fields"]
            ]
        return out
    if kind == "array":
        return {**node, "items": _expand(node["items"], defs, seen, namespace)}
    if kind == "map":
        return {**node, "values": _expand(node["values"], defs, seen, namespace)}
    if isinstance(kind, (dict, list)) or (isinstance(kind, str) and kind not in PRIMITIVES):
        return {**node, "type": _expand(kind, defs, seen, namespace)}
    return node


def _collect_named(node: Any, namespace: str | None, out: dict[str, dict[str, Any]]) -> None:
    if isinstance(node, list):
        for item in node:
            _collect_named(item, namespace, out)
    elif isinstance(node, dict):
        kind = node.get("type")
        if kind in ("record", "enum", "fixed"):
            ns = node.get("namespace", namespace)
            out[_full_name(node["name"], ns)] = {**node, "namespace": ns}
            for field in node.get("fields", []):
                _collect_named(field["type"], ns, out)
        elif kind == "array":
            _collect_named(node["items"], namespace, out)
        elif kind == "map":
            _collect_named(node["values"], namespace, out)


def expand_schemas(raw: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Given ``{file stem: schema}``, return ``{type name: self-contained schema}``."""
    defs: dict[str, dict[str, Any]] = {}
    for schema in raw.values():
        _collect_named(schema, schema.get("namespace"), defs)
    expanded: dict[str, dict[str, Any]] = {}
    for schema in raw.values():
        full = _full_name(schema["name"], schema.get("namespace"))
        expanded[schema["name"]] = _expand(full, defs, set(), schema.get("namespace"))
    return expanded


@lru_cache(maxsize=4)
def load_contracts(directory: Path = SCHEMA_DIR) -> dict[str, Contract]:
    """Every contract in ``directory``, keyed by type name (e.g. ``"InferenceRequest"``)."""
    raw = {path.stem: json.loads(path.read_text()) for path in sorted(directory.glob("*.avsc"))}
    if not raw:
        raise FileNotFoundError(f"no .avsc files in {directory}")
    return {
        name: Contract(name=name, schema=schema, parsed=fastavro.parse_schema(copy.deepcopy(schema)))
        for name, schema in expand_schemas(raw).items()
    }


def contract(name: str) -> Contract:
    try:
        return load_contracts()[name]
    except KeyError:
        raise KeyError(f"no contract named {name!r}; known: {sorted(load_contracts())}") from None


class Compatibility(StrEnum):
    """Confluent Schema Registry compatibility levels."""

    NONE = "NONE"
    BACKWARD = "BACKWARD"
    BACKWARD_TRANSITIVE = "BACKWARD_TRANSITIVE"
    FORWARD = "FORWARD"
    FORWARD_TRANSITIVE = "FORWARD_TRANSITIVE"
    FULL = "FULL"
    FULL_TRANSITIVE = "FULL_TRANSITIVE"


def _incompatibilities(reader: str, writer: str) -> list[str]:
    result = ReaderWriterCompatibilityChecker().get_compatibility(
        avro.schema.parse(reader), avro.schema.parse(writer)
    )
    if result.compatibility is SchemaCompatibilityType.compatible:
        return []
    return [str(message) for message in result.messages] or ["incompatible"]


def check_compatibility(new: str, previous: list[str], level: Compatibility) -> list[str]:
    """Problems registering ``new`` after ``previous`` (oldest first) under ``level``; [] if fine.

    BACKWARD: consumers on the new schema can read data written with the previous one.
    FORWARD: consumers on the previous schema can read data written with the new one.
    FULL: both. ``_TRANSITIVE`` checks every earlier version instead of only the latest.
    """
    if level is Compatibility.NONE or not previous:
        return []
    against = previous if level.value.endswith("_TRANSITIVE") else previous[-1:]
    problems: list[str] = []
    for old in against:
        if level.value.startswith(("BACKWARD", "FULL")):
            problems += [f"new schema cannot read old data: {m}" for m in _incompatibilities(new, old)]
        if level.value.startswith(("FORWARD", "FULL")):
            problems += [f"old schema cannot read new data: {m}" for m in _incompatibilities(old, new)]
    return problems
