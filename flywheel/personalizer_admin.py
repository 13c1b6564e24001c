"""Operator actions on personalisation state: a user's adapter history, and rollbacks."""

from __future__ import annotations

from typing import Any

from agents.personalizer_store import PersonalizerStore
from infra.connect import connect
from infra.settings import Settings
from streams.kafka import EventProducer


async def history(settings: Settings, user_id: str) -> list[dict[str, Any]]:
    services = await connect(settings, "flywheel-personalizer-admin")
    try:
        rows = await services.pool.fetch(
            "SELECT version, adapter_hash, uri, parent_hash, rollback, created_at FROM adapters "
            "WHERE user_id = $1 ORDER BY version", user_id)
        return [{**dict(r), "created_at": r["created_at"].isoformat()} for r in rows]
    finally:
        await services.close()


async def rollback(settings: Settings, user_id: str, to_version: int | None) -> dict[str, Any]:
    """Announce an earlier adapter (or the base model) for the user; returns the event sent."""
    services = await connect(settings, "flywheel-personalizer-admin")
    producer = EventProducer(services.kafka, services.serde, services.capabilities)
    await producer.start()
    try:
        async def publish(event: dict[str, Any]) -> None:
            await producer.send_and_wait(services.catalog.adapters, event, key=user_id)

        return await PersonalizerStore(services.pool).rollback(user_id, to_version, publish)
    finally:
        await producer.stop()
        await services.close()
