"""The process side of "learning yields to serving" (the rule: ``core.scheduling.yielding``).

``run_as_background()`` lowers the calling process's CPU priority (``nice``), so the kernel gives a
serving worker the core whenever both want it; ``ServingPressureWatcher`` follows the workers'
heartbeats and lets a learner wait, between units of work, while serving holds requests. Both
are used by the trainer and the personaliser; docs/SCHEDULING.md describes the mechanism.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time

from aiokafka import AIOKafkaConsumer

from core.errors import DeadLetterError
from core.scheduling.yielding import BackoffConfig, ServingPressure
from infra.connect import Services
from streams.events import event_time_ms

log = logging.getLogger(__name__)


def run_as_background(niceness: int) -> int:
    """Raise this process's nice value to at least ``niceness`` (never lowers it); returns the value."""
    if niceness <= 0 or not hasattr(os, "nice"):
        return 0
    current = os.getpriority(os.PRIO_PROCESS, 0)
    if current < niceness:
        with contextlib.suppress(PermissionError, OSError):
            os.setpriority(os.PRIO_PROCESS, 0, niceness)
    value = os.getpriority(os.PRIO_PROCESS, 0)
    log.info("background learning at nice %d", value)
    return value


class ServingPressureWatcher:
    """Follows the heartbeats topic; ``wait_for_quiet`` holds a learner back while workers are busy."""

    def __init__(self, services: Services, config: BackoffConfig | None = None) -> None:
        self.services = services
        self.pressure = ServingPressure(config or BackoffConfig())
        self._task: asyncio.Task[None] | None = None
        self.waited_s = 0.0
        """Total time learners spent waiting for serving (for logs and metrics)."""

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._follow(), name="serving-pressure")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _follow(self) -> None:
        consumer = AIOKafkaConsumer(self.services.catalog.heartbeats, **self.services.kafka.client_kwargs(),
                                    group_id=None, auto_offset_reset="earliest")
        await consumer.start()
        try:
            while True:
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    for r in records:
                        try:
                            _, event = await self.services.serde.deserialize(r.value)
                        except DeadLetterError:
                            continue  # advisory: a bad heartbeat only misses an update
                        self.pressure.on_heartbeat(event, min(time.time(), event_time_ms(event) / 1000))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # learning must go on without the signal rather than stop
            log.warning("serving-pressure watcher stopped: %s", exc)
        finally:
            await consumer.stop()

    async def wait_for_quiet(self) -> float:
        """Wait while serving holds requests (bounded by ``max_wait_s``); returns seconds waited."""
        cfg = self.pressure.config
        started = time.monotonic()
        waited = 0.0
        while self.pressure.should_wait(time.time(), waited):
            await asyncio.sleep(cfg.poll_s)
            waited = time.monotonic() - started
        self.waited_s += waited
        if waited > 1.0:
            log.info("waited %.1f s for serving to go quiet", waited)
        return waited
