"""Postgres access: the asyncpg pool and the migration runner.

Migrations are the numbered SQL files in ``migrations/`` (``0001_registry.sql``, ...). Each file
is applied in one transaction and recorded in ``schema_migrations`` with its SHA-256. Running
the migrator twice is a no-op; a migration that was applied and later edited is refused (its
checksum no longer matches), because the database would silently differ from the code.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

from core.errors import FatalError, RetriableError

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
# One advisory lock id for "migrations in progress" so concurrent starters serialise.
_MIGRATION_LOCK = 0x466C7977


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


async def create_pool(url: str, min_size: int = 1, max_size: int = 10) -> asyncpg.Pool:
    """An asyncpg pool with JSONB mapped to Python objects and pgvector registered when present."""

    async def init(conn: asyncpg.Connection) -> None:
        await _init_connection(conn)
        has_vector = await conn.fetchval("SELECT count(*) FROM pg_type WHERE typname = 'vector'")
        if has_vector:
            from pgvector.asyncpg import register_vector

            await register_vector(conn)

    try:
        pool = await asyncpg.create_pool(url, min_size=min_size, max_size=max_size, init=init)
    except (OSError, asyncpg.CannotConnectNowError) as exc:
        raise RetriableError(f"cannot connect to Postgres: {exc}") from exc
    assert pool is not None
    return pool


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def discover_migrations(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    found: list[Migration] = []
    for path in sorted(directory.glob("*.sql")):
        match = _NAME.match(path.name)
        if not match:
            raise FatalError(f"migration file {path.name!r} must be named NNNN_lower_snake.sql")
        found.append(Migration(int(match.group(1)), path.name, path.read_text()))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise FatalError(f"duplicate migration numbers in {directory}: {versions}")
    return found


async def migrate(conn: asyncpg.Connection, directory: Path = MIGRATIONS_DIR) -> list[str]:
    """Apply pending migrations in order; return the names applied (empty when up to date)."""
    await conn.execute(
        """CREATE TABLE IF NOT EXISTS schema_migrations (
               version integer PRIMARY KEY,
               name text NOT NULL,
               checksum text NOT NULL,
               applied_at timestamptz NOT NULL DEFAULT now())"""
    )
    await conn.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK)
    try:
        applied: dict[int, Any] = {
            row["version"]: row for row in await conn.fetch("SELECT * FROM schema_migrations")
        }
        done: list[str] = []
        for migration in discover_migrations(directory):
            previous = applied.get(migration.version)
            if previous is not None:
                if previous["checksum"] != migration.checksum:
                    raise FatalError(
                        f"migration {migration.name} was applied with checksum {previous['checksum'][:12]} "
                        f"but the file now hashes to {migration.checksum[:12]}: applied migrations must "
                        "not be edited; add a new migration instead"
                    )
                continue
            async with conn.transaction():
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                    migration.version, migration.name, migration.checksum,
                )
            log.info("applied migration %s", migration.name)
            done.append(migration.name)
        return done
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _MIGRATION_LOCK)
