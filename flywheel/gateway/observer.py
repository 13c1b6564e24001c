"""The gateway's view of the running system: a read-only consumer of the service's topics that
feeds :class:`ServiceStats`, and a consumer-lag monitor used for admission control.

Responses and decisions are read from the end (live traffic); adapters, models and heartbeats
are compacted state topics and are read from the beginning, so versions are known at once.
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

log = logging.getLogger(__name__)


def router_group(services: Services) -> str:
    return f"{services.settings.topic_prefix}flywheel-router"


def worker_group(services: Services, model: str) -> str:
    return f"{services.settings.topic_prefix}flywheel-worker-{model}"


class Observer:
    def __init__(self, services: Services, stats: ServiceStats) -> None:
        self.services = services
        self.stats = stats
        catalog = services.catalog
        live_topics = [catalog.responses, catalog.feedback, *(catalog.decisions(m) for m in catalog.models)]
        self.live = EventConsumer(services.kafka, services.serde, live_topics, group_id=None,
                                  auto_offset_reset="latest")
        self.state = EventConsumer(services.kafka, services.serde,
                                   [catalog.adapters, catalog.models_topic, catalog.heartbeats],
                                   group_id=None, auto_offset_reset="earliest")
        self._deadlines: OrderedDict[str, int] = OrderedDict()
        self._tasks: list[asyncio.Task[None]] = []
        self._admin: AIOKafkaAdminClient | None = None
        self._probe: AIOKafkaConsumer | None = None
        self.lag_total = 0

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
            self.stats.feedback += 1
        elif topic == catalog.adapters:
            self.stats.on_adapter(event)
        elif topic == catalog.models_topic:
            self.stats.on_model(event)
        elif topic == catalog.heartbeats:
            self.stats.on_heartbeat(event)
        else:
            self.stats.on_decision(event)
            self._remember_deadline(event["request"])

    async def _consume(self, consumer: EventConsumer) -> None:
        async for batch in consumer.batches(timeout_ms=200):
            for item in batch:
                if item.event is not None:
                    self.apply(item.record.topic, item.event)

    async def lag(self) -> dict[str, int]:
        """Records not yet processed, per consuming stage (router and each model's workers)."""
        if self._admin is None or self._probe is None:
            self._admin = AIOKafkaAdminClient(**self.services.kafka.client_kwargs())
            self._probe = AIOKafkaConsumer(**self.services.kafka.client_kwargs(), group_id=None)
            await self._admin.start()
            await self._probe.start()
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
            await asyncio.sleep(interval_s)

