"""Postgres access for the rewarder (tables in ``migrations/0005_reward_model.sql``).

JSONB columns travel as Python objects (the pool's codec, see ``infra.db``); features travel as
float32 bytes.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any

import asyncpg
import numpy as np

from core.reward_model import Label


@dataclass(frozen=True)
class Texts:
    prompt: str
    response: str
    model: str


@dataclass(frozen=True)
class ExampleRow:
    seq: int
    feedback_id: str
    label: Label
    status: str
    features: np.ndarray | None
    age_s: float
    scope: str


@dataclass(frozen=True)
class UnscoredRollout:
    request_id: str
    user_id: str
    tenant_id: str
    prompt: str
    response: str


def _row(r: asyncpg.Record) -> ExampleRow:
    label = r["label"]
    features = np.frombuffer(r["features"], dtype=np.float32).copy() if r["features"] is not None else None
    return ExampleRow(int(r["seq"]), r["feedback_id"],
                      Label(label["kind"], tuple(label["request_ids"]), float(label["target"]),
                            float(label["weight"])), r["status"], features, float(r["age_s"]), r["scope"])


class RewarderStore:
    def __init__(self, pool: asyncpg.Pool, deployment: str) -> None:
        self.pool = pool
        self.deployment = deployment

    # --- the texts join ---------------------------------------------------------------------------
    async def record_prompt(self, request_id: str, user_id: str, tenant_id: str, prompt: str) -> None:
        await self.pool.execute(
            "INSERT INTO reward_texts (deployment, request_id, user_id, tenant_id, prompt) VALUES ($1, $2, $3, $4, $5) "
            "ON CONFLICT (deployment, request_id) DO UPDATE SET prompt = EXCLUDED.prompt, updated_at = now()",
            self.deployment, request_id, user_id, tenant_id, prompt)

    async def record_response(self, request_id: str, user_id: str, text: str, model: str,
                              model_version: str | None) -> None:
        await self.pool.execute(
            "INSERT INTO reward_texts (deployment, request_id, user_id, response, model, model_version) "
            "VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (deployment, request_id) DO UPDATE SET "
            "response = EXCLUDED.response, model = EXCLUDED.model, model_version = EXCLUDED.model_version, "
            "updated_at = now()", self.deployment, request_id, user_id, text, model, model_version)

    async def record_rollout(self, rollout: dict[str, Any]) -> None:
        """A rollout carries both texts; it becomes a candidate for a model reward."""
        await self.pool.execute(
            "INSERT INTO reward_texts (deployment, request_id, user_id, tenant_id, prompt, response, model, "
            "model_version, rollout_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, now()) "
            "ON CONFLICT (deployment, request_id) DO UPDATE SET "
            "prompt = EXCLUDED.prompt, response = EXCLUDED.response, model = EXCLUDED.model, "
            "model_version = EXCLUDED.model_version, "
            "rollout_at = COALESCE(reward_texts.rollout_at, EXCLUDED.rollout_at), updated_at = now()",
            self.deployment, rollout["request_id"], rollout["user_id"], rollout["tenant_id"], rollout["prompt"],
            rollout["response"], rollout["model"], rollout["model_version"])

    async def texts(self, request_ids: list[str]) -> dict[str, Texts]:
        rows = await self.pool.fetch(
            "SELECT request_id, prompt, response, model FROM reward_texts WHERE deployment = $1 "
            "AND request_id = ANY($2::text[]) AND prompt IS NOT NULL AND response IS NOT NULL",
            self.deployment, request_ids)
        return {r["request_id"]: Texts(r["prompt"], r["response"], r["model"] or "") for r in rows}

    # --- feedback -------------------------------------------------------------------------------
    async def record_feedback(self, feedback: dict[str, Any], rewarded: list[str], label: Label | None) -> None:
        """Mark the rewarded requests rated and queue the feedback's example (idempotent)."""
        async with self.pool.acquire() as conn, conn.transaction():
            if rewarded:
                await conn.executemany(
                    "INSERT INTO reward_texts (deployment, request_id, user_id, tenant_id, rated) "
                    "VALUES ($1, $2, $3, $4, true) "
                    "ON CONFLICT (deployment, request_id) DO UPDATE SET rated = true, updated_at = now()",
                    [(self.deployment, rid, feedback["user_id"], feedback["tenant_id"]) for rid in rewarded])
            if label is not None:
                await conn.execute(
                    "INSERT INTO reward_examples (deployment, feedback_id, label) VALUES ($1, $2, $3) "
                    "ON CONFLICT (deployment, feedback_id) DO NOTHING",
                    self.deployment, feedback["event_id"], asdict(label) | {"request_ids": list(label.request_ids)})

    # --- examples -------------------------------------------------------------------------------
    async def examples_after(self, seq: int, limit: int = 256) -> list[ExampleRow]:
        rows = await self.pool.fetch(
            "SELECT seq, feedback_id, label, status, features, scope, "
            "extract(epoch FROM now() - created_at)::float8 AS age_s FROM reward_examples "
            "WHERE deployment = $1 AND seq > $2 ORDER BY seq LIMIT $3", self.deployment, seq, limit)
        return [_row(r) for r in rows]

    async def examples_by_id(self, feedback_ids: list[str]) -> dict[str, ExampleRow]:
        rows = await self.pool.fetch(
            "SELECT seq, feedback_id, label, status, features, scope, 0.0::float8 AS age_s FROM reward_examples "
            "WHERE deployment = $1 AND feedback_id = ANY($2::text[])", self.deployment, feedback_ids)
        return {r["feedback_id"]: _row(r) for r in rows}

    async def decide(self, feedback_id: str, features: np.ndarray | None, reason: str | None,
                     scope: str = "") -> ExampleRow:
        """Settle a waiting row (joined with ``features`` and ``scope``, else unjoinable with
        ``reason``); the first decision wins, and the row as decided is returned."""
        status = "joined" if features is not None else "unjoinable"
        data = features.astype(np.float32).tobytes() if features is not None else None
        await self.pool.execute(
            "UPDATE reward_examples SET status = $3, features = $4, reason = $5, scope = $6 "
            "WHERE deployment = $1 AND feedback_id = $2 AND status = 'waiting'",
            self.deployment, feedback_id, status, data, reason, scope)
        return (await self.examples_by_id([feedback_id]))[feedback_id]

    async def prune_examples(self, kept_ids: list[str], last_seq: int) -> None:
        """Forget folded examples the model's snapshot no longer names (older than all it names, and
        than a day, so recent ones stay for inspection: ``reason`` says why one was skipped)."""
        await self.pool.execute(
            "DELETE FROM reward_examples WHERE deployment = $1 AND created_at < now() - interval '1 day' "
            "AND seq <= $2 AND seq < COALESCE("
            "(SELECT min(seq) FROM reward_examples WHERE deployment = $1 AND feedback_id = ANY($3::text[])), $2 + 1)",
            self.deployment, last_seq, kept_ids)

    # --- the model's state ---------------------------------------------------------------------------
    async def load_state(self) -> tuple[int, dict[str, Any] | None, int]:
        """(last folded seq, snapshot or None, rollouts scored so far)."""
        row = await self.pool.fetchrow("SELECT last_seq, snapshot, scored FROM reward_model_state "
                                       "WHERE deployment = $1", self.deployment)
        if row is None:
            return 0, None, 0
        return int(row["last_seq"]), row["snapshot"], int(row["scored"])

    async def save_snapshot(self, last_seq: int, snapshot: dict[str, Any]) -> None:
        await self.pool.execute(
            "INSERT INTO reward_model_state (deployment, last_seq, snapshot) VALUES ($1, $2, $3) "
            "ON CONFLICT (deployment) DO UPDATE SET last_seq = EXCLUDED.last_seq, snapshot = EXCLUDED.snapshot, "
            "updated_at = now()", self.deployment, last_seq, snapshot)

    async def save_figures(self, *, accuracy: float | None, heldout: int, examples: int, skipped: int,
                           usable: bool, threshold: float, scored: int, per_model: dict[str, Any]) -> None:
        await self.pool.execute(
            "INSERT INTO reward_model_state (deployment, accuracy, heldout, examples, skipped, usable, threshold, "
            "scored, per_model) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT (deployment) DO UPDATE SET "
            "accuracy = EXCLUDED.accuracy, heldout = EXCLUDED.heldout, examples = EXCLUDED.examples, "
            "skipped = EXCLUDED.skipped, usable = EXCLUDED.usable, threshold = EXCLUDED.threshold, "
            "scored = EXCLUDED.scored, per_model = EXCLUDED.per_model, updated_at = now()",
            self.deployment, accuracy, heldout, examples, skipped, usable, threshold, scored, per_model)

    # --- rollouts nobody rated ------------------------------------------------------------------
    async def score_pass(self, models: list[str], older_than_s: float, newer_than_s: float,
                         score: Callable[[list[UnscoredRollout]], Awaitable[None]], limit: int = 64) -> int:
        """Hand ``score`` the rollouts of ``models`` that waited ``older_than_s`` without feedback (but
        not longer than ``newer_than_s``: by then the trainer has let them go) and mark them scored once it
        returns; one process per deployment at a time (an advisory lock), so replicas do not score
        the same rollout twice. If ``score`` fails nothing is marked and the next pass retries
        (the reward's event id is derived from the request id). Returns how many were scored."""
        async with self.pool.acquire() as conn, conn.transaction():
            if not await conn.fetchval("SELECT pg_try_advisory_xact_lock(hashtext('reward-model:' || $1))",
                                       self.deployment):
                return 0
            rows = await conn.fetch(
                "SELECT request_id, user_id, tenant_id, prompt, response FROM reward_texts "
                "WHERE deployment = $1 AND rollout_at IS NOT NULL AND NOT rated AND scored_at IS NULL "
                "AND rollout_at <= now() - make_interval(secs => $2) "
                "AND rollout_at > now() - make_interval(secs => $3) AND model = ANY($5::text[]) "
                "ORDER BY rollout_at LIMIT $4", self.deployment, older_than_s, newer_than_s, limit, models)
            if not rows:
                return 0
            rollouts = [UnscoredRollout(r["request_id"], r["user_id"], r["tenant_id"], r["prompt"], r["response"])
                        for r in rows]
            await score(rollouts)
            await conn.execute("UPDATE reward_texts SET scored_at = now() WHERE deployment = $1 "
                               "AND request_id = ANY($2::text[])", self.deployment, [r.request_id for r in rollouts])
            return len(rollouts)

    async def prune_texts(self, older_than_s: float) -> None:
        await self.pool.execute("DELETE FROM reward_texts WHERE deployment = $1 "
                                "AND updated_at < now() - make_interval(secs => $2)", self.deployment, older_than_s)
