"""The router's feedback path: read the (single-partition) feedback topic in order, apply each event
to the router state (``core.routing.state``), and journal it in Postgres together with the offset.

Every router replica reads the whole feedback topic itself (no consumer group), like a Kafka
Streams global table: all replicas converge on the same ratings, and a replica's position is the
offset in ``router_state``, not a group commit. Applying a batch and recording its offset happen
in one Postgres transaction, so a crash at any point resumes exactly after the last applied event.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Any

import asyncpg
import numpy as np
from aiokafka import AIOKafkaConsumer, TopicPartition

from core.embedding import Embedder
from core.errors import DeadLetterError, ValidationError
from core.routing.index import NeighbourIndex
from core.routing.state import RouterConfig, RouterFeedback, RouterState
from infra.connect import Services
from infra.telemetry import FEEDBACK_APPLIED, ROUTER_RATING
from streams.consumed import Consumed
from streams.dlq import DeadLetters
from streams.tracing import process_context

log = logging.getLogger(__name__)
SNAPSHOT_EVERY = 1000


def as_vector(value: Any) -> np.ndarray:
    """A pgvector column value (``pgvector.Vector``) as float32 numpy."""
    return np.asarray(value.to_numpy() if hasattr(value, "to_numpy") else value, dtype=np.float32)


def prompt_key(text: str) -> str:
    """Prompts that differ only in case and whitespace share their feedback history."""
    return hashlib.sha256(" ".join(text.lower().split()).encode()).hexdigest()[:24]


@dataclass
class Journalled:
    offset: int
    fb: RouterFeedback
    embedding: np.ndarray | None


async def load_state(pool: asyncpg.Pool, router_name: str, config: RouterConfig, models: tuple[str, ...]
                     ) -> tuple[RouterState, int]:
    """Rebuild the state from the last snapshot plus the journal after it; return (state, offset)."""
    row = await pool.fetchrow("SELECT * FROM router_state WHERE router_name = $1", router_name)
    rows = await pool.fetch("SELECT feedback_offset, prompt_key, embedding FROM router_feedback "
                            "WHERE router_name = $1 AND embedding IS NOT NULL ORDER BY feedback_offset", router_name)
    index = NeighbourIndex()
    if rows:
        index.add([r["prompt_key"] for r in rows], np.stack([as_vector(r["embedding"]) for r in rows]))
    if row is None:
        return RouterState(config, models, index), -1
    start = -1
    if row["snapshot"] is not None:
        state = RouterState.from_snapshot(row["snapshot"], index)
        start = row["snapshot_offset"]
    else:
        state = RouterState(config, models, index)
    tail = await pool.fetch("SELECT feedback_offset, feedback FROM router_feedback WHERE router_name = $1 "
                            "AND feedback_offset > $2 ORDER BY feedback_offset", router_name, start)
    for r in tail:
        state.apply(RouterFeedback(**r["feedback"]), None)  # vectors are already in the index
    return state, int(row["feedback_offset"])


class FeedbackApplier:
    """Applies feedback records to ``state`` and journals them (one instance per router process)."""

    def __init__(self, services: Services, state: RouterState, offset: int, router_name: str,
                 embedder: Embedder, dlq: DeadLetters) -> None:
        self.services = services
        self.state = state
        self.offset = offset
        self.router_name = router_name
        self.embedder = embedder
        self.dlq = dlq
        self.applied_since_snapshot = 0

    async def _placement(self, request_ids: list[str]) -> dict[str, tuple[str, np.ndarray]]:
        rows = await self.services.pool.fetch(
            "SELECT request_id, prompt_key, embedding FROM request_embeddings WHERE request_id = ANY($1::text[])",
            request_ids)
        return {r["request_id"]: (r["prompt_key"], as_vector(r["embedding"])) for r in rows}

    async def apply_records(self, records: list[Any]) -> None:
        """Apply one fetched batch in offset order, then journal it with the new offset."""
        todo: list[tuple[Any, dict[str, Any]]] = []
        for r in records:
            if r.offset <= self.offset:
                continue  # already applied before a restart
            try:
                _, event = await self.services.serde.deserialize(r.value)
                todo.append((r, event))
            except DeadLetterError as exc:
                await self._dead_letter(r, exc)
        placements = await self._placement([self._anchor(e) for _, e in todo])
        journal: list[Journalled] = []
        for r, event in todo:
            with process_context(r.topic, list(r.headers or []), r.partition, r.offset):
                try:
                    key, embedding = self._place(event, placements)
                    fb = RouterFeedback.from_event(event, key)
                    self.state.comparisons(fb)  # validate before touching the state
                    new_key = key not in self.state.ranker.index
                    self.state.apply(fb, embedding if new_key else None)
                    journal.append(Journalled(r.offset, fb, embedding if new_key else None))
                except DeadLetterError as exc:
                    await self._dead_letter(r, exc, event)
        last = max((r.offset for r in records), default=self.offset)
        if last > self.offset:
            await self._journal(journal, last)
            self.offset = last
            FEEDBACK_APPLIED.inc(len(journal))
            for model, rating in self.state.ranker.global_ratings().items():
                ROUTER_RATING.labels(model).set(rating)

    @staticmethod
    def _anchor(event: dict[str, Any]) -> str:
        pair = event.get("pairwise")
        return str(pair["request_id_a"]) if pair else str(event["request_id"])

    def _place(self, event: dict[str, Any], placements: dict[str, tuple[str, np.ndarray]]
               ) -> tuple[str, np.ndarray | None]:
        found = placements.get(self._anchor(event))
        if found is not None:
            return found
        if event.get("prompt"):
            key = prompt_key(event["prompt"])
            if key in self.state.ranker.index:
                return key, None
            return key, self.embedder.embed([event["prompt"]])[0]
        raise ValidationError(f"feedback {event['event_id']} is about request {self._anchor(event)}, which this "
                              "router never routed, and carries no prompt: it cannot be placed")

    async def _journal(self, journal: list[Journalled], last_offset: int) -> None:
        snapshot = None
        self.applied_since_snapshot += len(journal)
        if self.applied_since_snapshot >= SNAPSHOT_EVERY:
            snapshot = self.state.snapshot()
            self.applied_since_snapshot = 0
        async with self.services.pool.acquire() as conn, conn.transaction():
            await conn.executemany(
                """INSERT INTO router_feedback (router_name, feedback_offset, feedback_id, prompt_key, embedding,
                   feedback) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING""",
                [(self.router_name, j.offset, j.fb.feedback_id, j.fb.prompt_key, j.embedding, j.fb.to_json())
                 for j in journal])
            if snapshot is None:
                await conn.execute(
                    """INSERT INTO router_state (router_name, feedback_offset) VALUES ($1, $2)
                       ON CONFLICT (router_name) DO UPDATE SET feedback_offset = EXCLUDED.feedback_offset,
                       updated_at = now()""", self.router_name, last_offset)
            else:
                await conn.execute(
                    """INSERT INTO router_state (router_name, feedback_offset, snapshot, snapshot_offset)
                       VALUES ($1, $2, $3, $2) ON CONFLICT (router_name) DO UPDATE SET
                       feedback_offset = EXCLUDED.feedback_offset, snapshot = EXCLUDED.snapshot,
                       snapshot_offset = EXCLUDED.snapshot_offset, updated_at = now()""",
                    self.router_name, last_offset, json.loads(json.dumps(snapshot)))

    async def _dead_letter(self, record: Any, exc: DeadLetterError, event: dict[str, Any] | None = None) -> None:
        await self.dlq.publish(Consumed.of(record), exc, event)

    async def run(self, stop: asyncio.Event) -> None:
        """Follow the feedback topic from the journalled offset until ``stop`` is set."""
        topic = self.services.catalog.feedback
        consumer = AIOKafkaConsumer(**self.services.kafka.client_kwargs(), group_id=None, enable_auto_commit=False,
                                    isolation_level="read_committed" if self.services.capabilities.transactions
                                    else "read_uncommitted")
        await consumer.start()
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        consumer.seek(tp, self.offset + 1)
        log.info("router feedback reader at offset %d (%d models rated)", self.offset + 1,
                 len(self.state.ranker.models))
        try:
            while not stop.is_set():
                fetched = await consumer.getmany(tp, timeout_ms=200, max_records=500)
                records = fetched.get(tp, [])
                if records:
                    await self.apply_records(records)
        finally:
            await consumer.stop()
