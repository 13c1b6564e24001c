"""Postgres access for the personalisation agent (tables in ``migrations/0004_personalization.sql``).

JSONB columns travel as Python objects (the pool's codec, see ``infra.db``).
``adapter_published`` builds the registry row's event, so the agent and operator rollbacks announce alike.

Everything a feedback event changes -- the user's state, the applied-event marker and the adapter
registry row -- is written in one transaction (:meth:`PersonalizerStore.apply`), so a crash leaves
either all of it or none of it.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

import asyncpg

from core.errors import RetriableError
from core.personalization import ShownResponse
from core.personalization.online import AdapterRef, UserState
from streams.events import envelope, event_time_ms


def adapter_published(user: UserState, feedback: dict[str, Any] | None, base_model: str, rank: int,
                      parent_hash: str | None, metrics: dict[str, float], rollback: bool = False,
                      tenant_id: str = "default", base_version: str = "base") -> dict[str, Any]:
    """The AdapterPublished event for the user's current adapter (deterministic event id)."""
    assert user.current is not None
    event_id = hashlib.sha256(f"adapter:{user.user_id}:{user.current.version}".encode()).hexdigest()[:32]
    correlation = str(feedback["request_id"]) if feedback else f"adapter:{user.user_id}"
    return {
        **envelope(correlation, str(feedback["tenant_id"]) if feedback else tenant_id, user.user_id,
                   event_id=event_id, event_time_ms=event_time_ms(feedback) if feedback else None),
        "adapter_hash": user.current.adapter_hash, "base_model": base_model, "version": user.current.version,
        "uri": user.current.uri, "rank": rank, "parent_hash": parent_hash, "rollback": rollback,
        "metrics": {k: float(v) for k, v in metrics.items() if not math.isnan(v)},  # NaN: no steps ran
        "base_version": base_version,
    }


class StateConflict(RetriableError):
    """The user's state changed under the caller (an operator rollback): read it again."""


@dataclass(frozen=True)
class Shown:
    """A response a user was shown, joined from its request and its final response."""

    response: ShownResponse
    user_id: str
    adapter_version: str | None
    model: str | None


class PersonalizerStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    # --- the request/response join ---------------------------------------------------------------
    async def record_prompt(self, request_id: str, user_id: str, prompt: str) -> None:
        await self.pool.execute(
            "INSERT INTO personalizer_shown (request_id, user_id, prompt) VALUES ($1, $2, $3) "
            "ON CONFLICT (request_id) DO UPDATE SET prompt = EXCLUDED.prompt, updated_at = now()",
            request_id, user_id, prompt)

    async def record_response(self, request_id: str, user_id: str, text: str, model: str,
                              adapter_version: str | None) -> None:
        await self.pool.execute(
            "INSERT INTO personalizer_shown (request_id, user_id, response, model, adapter_version) "
            "VALUES ($1, $2, $3, $4, $5) ON CONFLICT (request_id) DO UPDATE SET response = EXCLUDED.response, "
            "model = EXCLUDED.model, adapter_version = EXCLUDED.adapter_version, updated_at = now()",
            request_id, user_id, text, model, adapter_version)

    async def shown(self, request_ids: Iterable[str], wait_s: float) -> dict[str, Shown]:
        """The joined responses among ``request_ids``, waiting up to ``wait_s`` for missing ones.

        Feedback can overtake the response it is about (they travel on different topics), so a
        short wait lets the response stream catch up before the feedback is declared unjoinable.
        """
        wanted = sorted(set(request_ids))
        deadline = time.monotonic() + wait_s
        while True:
            rows = await self.pool.fetch(
                "SELECT request_id, user_id, prompt, response, model, adapter_version FROM personalizer_shown "
                "WHERE request_id = ANY($1::text[]) AND prompt IS NOT NULL AND response IS NOT NULL", wanted)
            found = {r["request_id"]: Shown(ShownResponse(r["request_id"], r["prompt"], r["response"]),
                                            r["user_id"], r["adapter_version"], r["model"]) for r in rows}
            if len(found) == len(wanted) or time.monotonic() >= deadline:
                return found
            await asyncio.sleep(0.2)

    # --- user state and the adapter registry -----------------------------------------------------
    async def user(self, user_id: str) -> UserState:
        raw = await self.pool.fetchval("SELECT state FROM personalizer_users WHERE user_id = $1", user_id)
        return UserState.from_json(raw) if raw is not None else UserState.new(user_id)

    async def applied(self, feedback_id: str) -> bool:
        return bool(await self.pool.fetchval(
            "SELECT 1 FROM personalizer_applied WHERE feedback_id = $1", feedback_id))

    async def announcement_of(self, user_id: str, version: int) -> dict[str, Any] | None:
        """The AdapterPublished event recorded for one of the user's versions."""
        raw = await self.pool.fetchval("SELECT event FROM adapters WHERE user_id = $1 AND version = $2",
                                       user_id, version)
        return dict(raw) if raw is not None else None

    async def announcements_for(self, feedback_id: str) -> list[dict[str, Any]]:
        """AdapterPublished events a feedback event caused (re-sent when it is redelivered)."""
        rows = await self.pool.fetch("SELECT event FROM adapters WHERE feedback_id = $1 ORDER BY version",
                                     feedback_id)
        return [dict(r["event"]) for r in rows]

    async def apply(self, user: UserState, read_version: int, feedback_id: str | None,
                    announcement: dict[str, Any] | None, contribution: tuple[str, int] | None = None) -> None:
        """Persist the user's new state, the applied marker and the announced adapter together
        (and, for a CoMiGS mixture, the user's contribution ``(mixture uri, round)`` to rounds).

        ``read_version`` is the user's ``last_version`` when the caller read the state; if an
        operator rolled the user back meanwhile, nothing is written and :class:`StateConflict` is
        raised, so the caller re-applies the event to the new state (no lost update).
        """
        async with self.pool.acquire() as conn, conn.transaction():
            raw = await conn.fetchval("SELECT state FROM personalizer_users WHERE user_id = $1 FOR UPDATE",
                                      user.user_id)
            stored = int(raw.get("last_version", 0)) if raw is not None else 0
            if stored != read_version:
                raise StateConflict(f"user {user.user_id}: adapter version moved from {read_version} to {stored}")
            await conn.execute(
                "INSERT INTO personalizer_users (user_id, state) VALUES ($1, $2::jsonb) "
                "ON CONFLICT (user_id) DO UPDATE SET state = EXCLUDED.state, updated_at = now()",
                user.user_id, user.to_json())
            if feedback_id is not None:
                await conn.execute("INSERT INTO personalizer_applied (feedback_id, user_id) VALUES ($1, $2)",
                                   feedback_id, user.user_id)
            if announcement is not None:
                a = announcement
                await conn.execute(
                    "INSERT INTO adapters (user_id, version, adapter_hash, base_model, uri, parent_hash, rollback, "
                    "metrics, feedback_id, event, base_version) "
                    "VALUES ($1, $2, $3, $4, $5, $6, $7, $8::jsonb, $9, $10::jsonb, $11)",
                    a["user_id"], a["version"], a["adapter_hash"], a["base_model"], a["uri"], a["parent_hash"],
                    a["rollback"], a["metrics"], feedback_id, a, a.get("base_version", "base"))
            if contribution is not None:
                await conn.execute(
                    "INSERT INTO comigs_contributions (user_id, mixture_uri, round) VALUES ($1, $2, $3) "
                    "ON CONFLICT (user_id) DO UPDATE SET mixture_uri = EXCLUDED.mixture_uri, "
                    "round = EXCLUDED.round, updated_at = now()", user.user_id, contribution[0], contribution[1])

    # --- CoMiGS rounds -------------------------------------------------------------------------------
    async def current_round(self) -> tuple[int, str | None]:
        """(round number, uri of its averaged generalists); round 0 has none yet."""
        row = await self.pool.fetchrow("SELECT round, uri FROM comigs_rounds ORDER BY round DESC LIMIT 1")
        return (0, None) if row is None else (int(row["round"]), str(row["uri"]))

    async def round_contributions(self, round_: int) -> dict[str, str]:
        """User -> mixture uri of the updates that started from ``round_``'s generalists."""
        rows = await self.pool.fetch("SELECT user_id, mixture_uri FROM comigs_contributions WHERE round = $1",
                                     round_)
        return {r["user_id"]: r["mixture_uri"] for r in rows}

    async def close_round(self, round_: int, generalist_hash: str, uri: str, users: list[str]) -> bool:
        """Record round ``round_ + 1``'s generalists; False if another process recorded it first."""
        status = await self.pool.execute(
            "INSERT INTO comigs_rounds (round, generalist_hash, uri, users) VALUES ($1, $2, $3, $4::jsonb) "
            "ON CONFLICT (round) DO NOTHING", round_ + 1, generalist_hash, uri, sorted(users))
        return bool(status.endswith(" 1"))

    # --- re-basing -----------------------------------------------------------------------------------
    async def users_with_adapters(self) -> list[UserState]:
        """Every user with a current adapter, most recently active first."""
        rows = await self.pool.fetch("SELECT state FROM personalizer_users WHERE state->>'current' IS NOT NULL "
                                     "ORDER BY updated_at DESC")
        return [UserState.from_json(r["state"]) for r in rows]

    async def history(self, user_id: str) -> list[AdapterRef]:
        """Every adapter version announced for the user, oldest first."""
        rows = await self.pool.fetch(
            "SELECT version, adapter_hash, uri FROM adapters WHERE user_id = $1 ORDER BY version", user_id)
        return [AdapterRef(r["version"], r["adapter_hash"], r["uri"]) for r in rows]

    async def rollback(self, user_id: str, to_version: int | None, publish: Any) -> dict[str, Any]:
        """Make an earlier adapter (``to_version``; 0 = base model; None = the one before the
        current) the user's current one under a new version number. ``publish(event)`` sends the
        AdapterPublished event; it runs inside the transaction, so the registry never records a
        rollback that was not announced."""
        from core.personalization.online import rolled_back

        async with self.pool.acquire() as conn, conn.transaction():
            raw = await conn.fetchval("SELECT state FROM personalizer_users WHERE user_id = $1 FOR UPDATE",
                                      user_id)
            if raw is None:
                raise ValueError(f"user {user_id!r} has no personalisation state")
            user = UserState.from_json(raw)
            rows = await conn.fetch("SELECT version, adapter_hash, uri, base_model, base_version FROM adapters "
                                    "WHERE user_id = $1 ORDER BY version", user_id)
            versions = {r["version"]: r for r in rows}
            if to_version is None:  # the newest earlier version with other weights than the current
                current = user.current
                earlier = [r for r in rows if current is None or
                           (r["version"] < current.version and r["adapter_hash"] != current.adapter_hash)]
                to_version = earlier[-1]["version"] if earlier and current is not None else 0
            if to_version != 0 and to_version not in versions:
                raise ValueError(f"user {user_id!r} has no adapter version {to_version}; "
                                 f"known: {sorted(versions)}")
            target = None if to_version == 0 else AdapterRef(to_version, versions[to_version]["adapter_hash"],
                                                             versions[to_version]["uri"])
            base_model = rows[-1]["base_model"] if rows else ""
            parent = user.current.adapter_hash if user.current else None
            user = rolled_back(user, target)
            if user.current is None:  # back to the base model: announce an empty hash
                event = adapter_published(replace(user, current=AdapterRef(user.last_version, "", "")), None,
                                          base_model, 0, parent, {}, rollback=True)
            else:  # the restored adapter keeps the base version it was trained on (its pin)
                event = adapter_published(user, None, base_model, 0, parent, {}, rollback=True,
                                          base_version=versions[to_version]["base_version"])
            await conn.execute(
                "UPDATE personalizer_users SET state = $2::jsonb, updated_at = now() WHERE user_id = $1",
                user_id, user.to_json())
            await conn.execute(
                "INSERT INTO adapters (user_id, version, adapter_hash, base_model, uri, parent_hash, rollback, "
                "metrics, feedback_id, event, base_version) "
                "VALUES ($1, $2, $3, $4, $5, $6, true, '{}'::jsonb, NULL, $7::jsonb, $8)",
                user_id, event["version"], event["adapter_hash"], base_model, event["uri"], parent, event,
                event["base_version"])
            await publish(event)
            return event
