"""The gateway's view of the running system: a read-only consumer of the service's topics that
feeds :class:`ServiceStats`, a consumer-lag monitor used for admission control, and a poll of
how far each learner got through its input.

Responses, decisions, feedback and rewards are read from the end (live traffic); adapters,
models and heartbeats are compacted state topics and the dead-letter topics are short, so those
are read from the beginning: versions are known at once and dead letters are counted over the
topics' retention (30 days).

Learner progress (:meth:`Observer.progress`), per learner: ``read`` = how far into its input topic
it is (the router's journalled feedback offset; the personaliser's, rewarder's and trainer's
committed consumer-group offsets), ``dead_letters`` = records of that topic it dead-lettered,
``applied`` = read - dead_letters, ``waiting`` = the topic's end - read. The trainer's input is
the rewards topic, whose offsets it commits once a reward was trained on (or dropped as stale).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from core.slo import deadline_ms
from flywheel.gateway.stats import ServiceStats
from infra.connect import Services
from streams.events import event_time_ms
from streams.kafka import EventConsumer, partitions_of
from streams.topics import STAGES

log = logging.getLogger(__name__)
FEEDBACK_LEARNERS = ("router", "personalizer", "rewarder")


def router_group(services: Services) -> str:
    return f"{services.settings.topic_prefix}flywheel-router"


def worker_group(services: Services, model: str) -> str:
    return f"{services.settings.topic_prefix}flywheel-worker-{model}"


class Observer:
    def __init__(self, services: Services, stats: ServiceStats) -> None:
        self.services = services
        self.stats = stats
        catalog = services.catalog
        live_topics = [catalog.responses, catalog.feedback, catalog.rewards,
                       *(catalog.decisions(m) for m in catalog.models)]
        self.live = EventConsumer(services.kafka, services.serde, live_topics, group_id=None,
                                  auto_offset_reset="latest")
        self.state = EventConsumer(services.kafka, services.serde,
                                   [catalog.adapters, catalog.models_topic, catalog.heartbeats,
                                    *(catalog.dlq(stage) for stage in STAGES)],
                                   group_id=None, auto_offset_reset="earliest")
        self._deadlines: OrderedDict[str, int] = OrderedDict()
        self._tasks: list[asyncio.Task[None]] = []
        self._admin: AIOKafkaAdminClient | None = None
        self._probe: AIOKafkaConsumer | None = None
        self.lag_total = 0
        self.router_name: str | None = None
        """The routing algorithm of the latest decision (its journal is ``router_state[prefix + name]``)."""
        self._dead_by_origin: dict[tuple[str, str], int] = {}
        self._dead_seen: set[str] = set()
        self._dlq_topics = frozenset(catalog.dlq(stage) for stage in STAGES)

    async def start(self) -> None:
        await self.live.start()
        await self.live.raw.seek_to_end()
        await self.state.start()
        self._tasks = [asyncio.create_task(self._consume(self.live), name="observer-live"),
                       asyncio.create_task(self._consume(self.state), name="observer-state"),
                       asyncio.create_task(self._watch_lag(), name="observer-lag")]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.live.stop()
        await self.state.stop()
        if self._admin is not None and self._probe is not None:
            await self._probe.stop()
            await self._admin.close()

    def _remember_deadline(self, request: dict[str, Any]) -> None:
        self._deadlines[request["request_id"]] = deadline_ms(request)
        while len(self._deadlines) > 50_000:
            self._deadlines.popitem(last=False)

    def apply(self, topic: str, event: dict[str, Any]) -> None:
        catalog = self.services.catalog
        if topic == catalog.responses:
            self.stats.on_response(event)
            deadline = self._deadlines.pop(event["request_id"], None)
            if deadline is not None:
                self.stats.on_slo(event_time_ms(event) <= deadline)
        elif topic == catalog.feedback:
            self.stats.on_feedback(event)
        elif topic == catalog.rewards:
            self.stats.on_reward(event)
        elif topic in self._dlq_topics:
            if event["event_id"] in self._dead_seen:
                return  # the same record dead-lettered again after a retry: its id is derived from it
            self._dead_seen.add(event["event_id"])
            self.stats.on_dead_letter(event)
            key = (str(event["stage"]), str(event["origin_topic"]))
            self._dead_by_origin[key] = self._dead_by_origin.get(key, 0) + 1
        elif topic == catalog.adapters:
            self.stats.on_adapter(event)
        elif topic == catalog.models_topic:
            self.stats.on_model(event)
        elif topic == catalog.heartbeats:
            self.stats.on_heartbeat(event)
        else:
            self.stats.on_decision(event)
            self.router_name = event["router_name"]
            self._remember_deadline(event["request"])

    async def _consume(self, consumer: EventConsumer) -> None:
        async for batch in consumer.batches(timeout_ms=200):
            for item in batch:
                if item.event is not None:
                    self.apply(item.record.topic, item.event)

    async def _clients(self) -> tuple[AIOKafkaAdminClient, AIOKafkaConsumer]:
        if self._admin is None or self._probe is None:
            self._admin = AIOKafkaAdminClient(**self.services.kafka.client_kwargs())
            self._probe = AIOKafkaConsumer(**self.services.kafka.client_kwargs(), group_id=None)
            await self._admin.start()
            await self._probe.start()
        return self._admin, self._probe

    async def progress(self) -> dict[str, dict[str, int]]:
        """How far each learner is through its input topic (see the module docstring)."""
        admin, probe = await self._clients()
        catalog, prefix = self.services.catalog, self.services.settings.topic_prefix
        feedback = [TopicPartition(catalog.feedback, 0)]
        layout = await partitions_of(self.services.kafka, [catalog.rewards])
        rewards = [TopicPartition(catalog.rewards, p) for p in layout[catalog.rewards]]
        ends = await probe.end_offsets(feedback + rewards)
        # The router journals under its algorithm's name (prefixed by the deployment's topic prefix);
        # the decisions say which algorithm routes. Before the first decision nothing is known yet.
        journalled = None if self.router_name is None else await self.services.pool.fetchval(
            "SELECT feedback_offset FROM router_state WHERE router_name = $1", f"{prefix}{self.router_name}")
        read = {"router": int(journalled) + 1 if journalled is not None else 0}
        for name, partitions in (("personalizer", feedback), ("rewarder", feedback), ("trainer", rewards)):
            committed = await admin.list_consumer_group_offsets(f"{prefix}flywheel-{name}")
            read[name] = sum(committed[tp].offset if tp in committed and committed[tp].offset >= 0 else 0
                             for tp in partitions)
        out = {}
        for name, partitions in (*((n, feedback) for n in FEEDBACK_LEARNERS), ("trainer", rewards)):
            end = sum(ends[tp] for tp in partitions)
            dead = self.dead_letters_from(name, partitions[0].topic)
            out[name] = {"read": read[name], "applied": max(0, read[name] - dead), "dead_letters": dead,
                         "waiting": max(0, end - read[name]), "on_topic": end}
        return out

    def dead_letters_from(self, stage: str, topic: str) -> int:
        return self._dead_by_origin.get((stage, topic), 0)

    async def reward_model(self) -> dict[str, Any] | None:
        """The rewarder's reward model figures (``reward_model_state``), None before it ran."""
        row = await self.services.pool.fetchrow(
            "SELECT accuracy, heldout, examples, skipped, scored, usable, threshold, per_model, updated_at "
            "FROM reward_model_state WHERE deployment = $1", self.services.settings.topic_prefix)
        if row is None:
            return None
        return {"accuracy": row["accuracy"], "heldout": row["heldout"], "examples": row["examples"],
                "skipped": row["skipped"], "scored": row["scored"], "usable": row["usable"],
                "threshold": row["threshold"], "per_model": row["per_model"],
                "updated_at": row["updated_at"].timestamp()}

    async def lag(self) -> dict[str, int]:
        """Records not yet processed, per consuming stage (router and each model's workers)."""
        await self._clients()
        assert self._admin is not None and self._probe is not None
        catalog = self.services.catalog
        groups = {router_group(self.services): [catalog.requests]}
        groups |= {worker_group(self.services, m): [catalog.decisions(m)] for m in catalog.models}
        layout = await partitions_of(self.services.kafka, [t for ts in groups.values() for t in ts])
        out: dict[str, int] = {}
        for group, topics in groups.items():
            committed = await self._admin.list_consumer_group_offsets(group)
            partitions = [TopicPartition(t, p) for t in topics for p in layout[t]]
            ends = await self._probe.end_offsets(partitions)
            out[group] = sum(max(0, ends[tp] - (committed[tp].offset if tp in committed else 0))
                             for tp in partitions)
        return out

    async def _watch_lag(self, interval_s: float = 2.0) -> None:
        while True:
            try:
                self.stats.lag = await self.lag()
                self.lag_total = sum(self.stats.lag.values())
            except Exception as exc:  # monitoring must never take the gateway down
                log.warning("lag check failed: %s", exc)
            try:
                self.stats.learners = await self.progress()
                self.stats.reward_model = await self.reward_model()
            except Exception as exc:
                log.warning("learner progress check failed: %s", exc)
            await asyncio.sleep(interval_s)

