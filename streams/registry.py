"""Schema registries: one interface, two implementations.

* :class:`ConfluentRegistry` speaks the Confluent Schema Registry REST API (also served by
  Karapace, Redpanda and Apicurio's ccompat endpoint).
* :class:`PostgresRegistry` keeps subjects, versions and ids in Postgres: the default setup
  needs no extra service. It checks compatibility with the same rules (``avro`` package).

Both cache ids and schemas in memory: ids are immutable, so a cache hit is always right.
Subjects follow the TopicNameStrategy: ``<topic>-value``.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from typing import Any

import asyncpg
import httpx

from core.errors import FatalError, IncompatibleSchemaError, RetriableError, SerializationError
from streams.schemas import Compatibility, check_compatibility


def canonical(schema: str | dict[str, Any]) -> str:
    obj = json.loads(schema) if isinstance(schema, str) else schema
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def subject_for(topic: str) -> str:
    return f"{topic}-value"


class SchemaRegistry(ABC):
    """Register schemas under subjects and look them up by id."""

    def __init__(self) -> None:
        self._by_id: dict[int, str] = {}
        self._ids: dict[tuple[str, str], int] = {}

    async def register(self, subject: str, schema: str | dict[str, Any]) -> int:
        """Register (idempotently) and return the schema id; raises IncompatibleSchemaError."""
        text = canonical(schema)
        key = (subject, text)
        if key not in self._ids:
            schema_id = await self._register(subject, text)
            self._ids[key] = schema_id
            self._by_id[schema_id] = text
        return self._ids[key]

    async def schema_by_id(self, schema_id: int) -> str:
        """The schema text for an id; raises SerializationError for an unknown id."""
        if schema_id not in self._by_id:
            text = await self._fetch(schema_id)
            if text is None:
                raise SerializationError(f"unknown schema id {schema_id}")
            self._by_id[schema_id] = canonical(text)
        return self._by_id[schema_id]

    def cached_schema(self, schema_id: int) -> str | None:
        return self._by_id.get(schema_id)

    @abstractmethod
    async def _register(self, subject: str, schema: str) -> int: ...

    @abstractmethod
    async def _fetch(self, schema_id: int) -> str | None: ...

    @abstractmethod
    async def versions(self, subject: str) -> list[str]:
        """All schema texts registered under ``subject``, oldest first."""

    @abstractmethod
    async def set_compatibility(self, level: Compatibility, subject: str | None = None) -> None: ...

    @abstractmethod
    async def get_compatibility(self, subject: str | None = None) -> Compatibility: ...

    async def close(self) -> None:
        return None


class PostgresRegistry(SchemaRegistry):
    """The embedded registry: tables ``registry_*`` (migrations/0001)."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        super().__init__()
        self.pool = pool

    async def _register(self, subject: str, schema: str) -> int:
        fingerprint = hashlib.sha256(schema.encode()).hexdigest()
        async with self.pool.acquire() as conn, conn.transaction():
            # Serialise registrations per subject so two processes cannot both add version N.
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", subject)
            existing = await conn.fetchval(
                """SELECT s.id FROM registry_schemas s JOIN registry_subject_versions v ON v.schema_id = s.id
                   WHERE v.subject = $1 AND s.fingerprint = $2""", subject, fingerprint)
            if existing is not None:
                return int(existing)
            previous = [r["schema"] for r in await conn.fetch(
                """SELECT s.schema FROM registry_subject_versions v JOIN registry_schemas s ON s.id = v.schema_id
                   WHERE v.subject = $1 ORDER BY v.version""", subject)]
            level = await self._compatibility(conn, subject)
            problems = check_compatibility(schema, previous, level)
            if problems:
                raise IncompatibleSchemaError(subject, problems)
            schema_id = await conn.fetchval(
                """INSERT INTO registry_schemas (fingerprint, schema) VALUES ($1, $2)
                   ON CONFLICT (fingerprint) DO UPDATE SET fingerprint = EXCLUDED.fingerprint
                   RETURNING id""", fingerprint, schema)
            await conn.execute(
                """INSERT INTO registry_subject_versions (subject, version, schema_id)
                   VALUES ($1, $2, $3)""", subject, len(previous) + 1, schema_id)
            return int(schema_id)

    async def _fetch(self, schema_id: int) -> str | None:
        text: str | None = await self.pool.fetchval("SELECT schema FROM registry_schemas WHERE id = $1", schema_id)
        return text

    async def versions(self, subject: str) -> list[str]:
        rows = await self.pool.fetch(
            """SELECT s.schema FROM registry_subject_versions v JOIN registry_schemas s ON s.id = v.schema_id
               WHERE v.subject = $1 ORDER BY v.version""", subject)
        return [r["schema"] for r in rows]

    @staticmethod
    async def _compatibility(conn: asyncpg.Connection, subject: str | None) -> Compatibility:
        value = await conn.fetchval(
            """SELECT compatibility FROM registry_config WHERE subject = $1
               UNION ALL SELECT compatibility FROM registry_config WHERE subject = '' LIMIT 1""",
            subject or "")
        return Compatibility(value or "BACKWARD")

    async def get_compatibility(self, subject: str | None = None) -> Compatibility:
        async with self.pool.acquire() as conn:
            return await self._compatibility(conn, subject)

    async def set_compatibility(self, level: Compatibility, subject: str | None = None) -> None:
        await self.pool.execute(
            """INSERT INTO registry_config (subject, compatibility) VALUES ($1, $2)
               ON CONFLICT (subject) DO UPDATE SET compatibility = EXCLUDED.compatibility""",
            subject or "", level.value)


class ConfluentRegistry(SchemaRegistry):
    """Client for the Confluent Schema Registry REST API (Karapace, Redpanda, Apicurio ccompat)."""

    CONTENT_TYPE = "application/vnd.schemaregistry.v1+json"

    def __init__(self, url: str, username: str | None = None, password: str | None = None,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        super().__init__()
        auth = (username, password) if username and password else None
        self.http = httpx.AsyncClient(base_url=url.rstrip("/"), auth=auth, timeout=10.0, transport=transport,
                                      headers={"Content-Type": self.CONTENT_TYPE, "Accept": self.CONTENT_TYPE})

    async def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> httpx.Response:
        try:
            return await self.http.request(method, path, json=body)
        except httpx.TransportError as exc:
            raise RetriableError(f"schema registry unreachable: {exc}") from exc

    async def _register(self, subject: str, schema: str) -> int:
        check = await self._call("POST", f"/compatibility/subjects/{subject}/versions/latest?verbose=true",
                                 {"schema": schema})
        if check.status_code == 200 and not check.json().get("is_compatible", True):
            raise IncompatibleSchemaError(subject, list(check.json().get("messages", [])))
        response = await self._call("POST", f"/subjects/{subject}/versions", {"schema": schema})
        if response.status_code == 409:
            raise IncompatibleSchemaError(subject, [response.json().get("message", "incompatible")])
        if response.status_code >= 500:
            raise RetriableError(f"schema registry error {response.status_code}: {response.text}")
        if response.status_code != 200:
            raise FatalError(f"schema registry refused {subject}: {response.status_code} {response.text}")
        return int(response.json()["id"])

    async def _fetch(self, schema_id: int) -> str | None:
        response = await self._call("GET", f"/schemas/ids/{schema_id}")
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise RetriableError(f"schema registry error {response.status_code}: {response.text}")
        text: str = response.json()["schema"]
        return text

    async def versions(self, subject: str) -> list[str]:
        response = await self._call("GET", f"/subjects/{subject}/versions")
        if response.status_code == 404:
            return []
        texts = []
        for version in response.json():
            got = await self._call("GET", f"/subjects/{subject}/versions/{version}")
            texts.append(got.json()["schema"])
        return texts

    async def get_compatibility(self, subject: str | None = None) -> Compatibility:
        path = f"/config/{subject}?defaultToGlobal=true" if subject else "/config"
        response = await self._call("GET", path)
        body = response.json()
        return Compatibility(body.get("compatibilityLevel") or body.get("compatibility") or "BACKWARD")

    async def set_compatibility(self, level: Compatibility, subject: str | None = None) -> None:
        path = f"/config/{subject}" if subject else "/config"
        response = await self._call("PUT", path, {"compatibility": level.value})
        if response.status_code != 200:
            raise FatalError(f"cannot set compatibility: {response.status_code} {response.text}")

    async def close(self) -> None:
        await self.http.aclose()


class InMemoryRegistry(SchemaRegistry):
    """A registry in one process's memory, with the same compatibility rules (tests, tools)."""

    def __init__(self, compatibility: Compatibility = Compatibility.BACKWARD) -> None:
        super().__init__()
        self._schemas: list[str] = []
        self._subjects: dict[str, list[int]] = {}
        self._config: dict[str, Compatibility] = {"": compatibility}

    async def _register(self, subject: str, schema: str) -> int:
        if schema in self._schemas:
            schema_id = self._schemas.index(schema) + 1
            if schema_id in self._subjects.get(subject, []):
                return schema_id
        problems = check_compatibility(schema, await self.versions(subject),
                                       await self.get_compatibility(subject))
        if problems:
            raise IncompatibleSchemaError(subject, problems)
        if schema not in self._schemas:
            self._schemas.append(schema)
        schema_id = self._schemas.index(schema) + 1
        self._subjects.setdefault(subject, []).append(schema_id)
        return schema_id

    async def _fetch(self, schema_id: int) -> str | None:
        return self._schemas[schema_id - 1] if 0 < schema_id <= len(self._schemas) else None

    async def versions(self, subject: str) -> list[str]:
        return [self._schemas[i - 1] for i in self._subjects.get(subject, [])]

    async def get_compatibility(self, subject: str | None = None) -> Compatibility:
        return self._config.get(subject or "", self._config[""])

    async def set_compatibility(self, level: Compatibility, subject: str | None = None) -> None:
        self._config[subject or ""] = level
