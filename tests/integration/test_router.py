"""The router agent (default: local quality) on the real broker: decisions, feedback, restarts, liveness.

The default router explores about 10 % of requests (the draw is a function of the request id), so
where a test expects the greedy choice it accepts a decision that says it was exploratory.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import uuid

import pytest

from infra.connect import connect
from streams.events import envelope
from streams.kafka import EventConsumer, EventProducer
from tests.conftest import flywheel_env
from tests.integration.conftest import make_settings

pytestmark = pytest.mark.integration
SMOL, GEMMA = "smollm2-135m", "gemma3-270m"


@contextlib.contextmanager
def router_process(prefix: str):
    proc = subprocess.Popen([sys.executable, "-m", "flywheel.cli", "router"],
                            env=flywheel_env(FLYWHEEL_TOPIC_PREFIX=prefix, FLYWHEEL_LOG_LEVEL="WARNING"))
    try:
        yield proc
    finally:
        proc.terminate()
        proc.wait(30)


def heartbeat(model: str, worker: str, healthy: bool = True) -> dict:
    return {**envelope(worker, "t", "system"), "worker_id": worker, "model": model, "model_version": "base",
            "healthy": healthy, "queue_length": 0, "running": 0, "tokens_per_s": 0.0, "memory_rss_mb": 0.0,
            "loaded_adapters": [], "policy": "slo_odbs", "interval_ms": 1000}


class Harness:
    def __init__(self, services):
        self.s = services
        self.producer = EventProducer(services.kafka, services.serde, services.capabilities)
        topics = [services.catalog.decisions(SMOL), services.catalog.decisions(GEMMA), services.catalog.responses]
        self.consumer = EventConsumer(services.kafka, services.serde, topics, group_id=None,
                                      auto_offset_reset="earliest")
        self.decisions: dict[str, dict] = {}
        self.beating: set[str] = set()
        self._tasks: list[asyncio.Task] = []

    async def __aenter__(self):
        await self.producer.start()
        await self.consumer.start()
        self._tasks = [asyncio.create_task(self._read()), asyncio.create_task(self._beat())]
        return self

    async def __aexit__(self, *exc):
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.consumer.stop()
        await self.producer.stop()

    async def _read(self):
        async for batch in self.consumer.batches(timeout_ms=100):
            for item in batch:
                if item.event is not None:
                    key = item.event.get("request", item.event)["request_id"]
                    self.decisions[key] = item.event

    async def _beat(self):
        while True:
            for model in self.beating:
                await self.producer.send_and_wait(self.s.catalog.heartbeats, heartbeat(model, f"w-{model}"),
                                                  key=f"w-{model}")
            await asyncio.sleep(1.0)

    async def ask(self, prompt: str, timeout_s: float = 90, **extra) -> dict:
        rid = uuid.uuid4().hex
        from streams.events import inference_request
        req = inference_request(user_id="u1", prompt=prompt, request_id=rid, max_tokens=32, **extra)
        await self.producer.send_and_wait(self.s.catalog.requests, req, key="u1")
        deadline = asyncio.get_running_loop().time() + timeout_s
        while rid not in self.decisions:
            assert asyncio.get_running_loop().time() < deadline, "no decision"
            await asyncio.sleep(0.1)
        return self.decisions[rid]

    async def feedback(self, request_id: str, **fields) -> None:
        from streams.events import feedback
        await self.producer.send_and_wait(self.s.catalog.feedback,
                                          feedback(user_id="u1", request_id=request_id, **fields), key="u1")


async def test_router_decisions_feedback_restart_and_liveness(kafka_broker, postgres):
    prefix = f"router{uuid.uuid4().hex[:6]}."
    services = await connect(make_settings(topic_prefix=prefix), "router-test", run_migrations=True,
                             create_topics=True)
    try:
        async with Harness(services) as h:
            h.beating = {SMOL, GEMMA}
            with router_process(prefix):
                first = await h.ask("What is the capital of France?")
                assert first["model"] in (SMOL, GEMMA)
                assert {c["model"] for c in first["candidates"]} == {SMOL, GEMMA}
                assert first["router_name"] == "local_quality" and first["feedback_offset"] == -1
                assert first["model"] == SMOL or first["exploratory"]  # equal ratings: the cheaper model wins
                assert first["exploratory"] == (first["reason"].startswith("explore:"))
                # users prefer gemma's answers, strongly and repeatedly
                for i in range(6):
                    d = await h.ask(f"Explain photosynthesis, variant {i}")
                    await h.feedback(d["request"]["request_id"], kind="pairwise", model=None,
                                     pairwise={"request_id_a": d["request"]["request_id"], "model_a": GEMMA,
                                               "request_id_b": d["request"]["request_id"], "model_b": SMOL,
                                               "winner": "a"})
                await asyncio.sleep(3)
                later = await h.ask("Explain photosynthesis to a child")
                assert later["model"] == GEMMA or later["exploratory"], later["reason"]
                ratings = {c["model"]: c["global_rating"] for c in later["candidates"]}
                assert ratings[GEMMA] > ratings[SMOL]
                offset_before = later["feedback_offset"]
                assert offset_before >= 5
            with router_process(prefix):  # restarted: same ratings, same offset
                again = await h.ask("Explain photosynthesis for an exam")
                assert again["feedback_offset"] == offset_before
                assert {c["model"]: c["global_rating"] for c in again["candidates"]} == ratings
                assert again["model"] == GEMMA or again["exploratory"]
                h.beating = {SMOL}  # gemma's worker stops heart-beating
                await asyncio.sleep(12)
                skipped = await h.ask("Explain photosynthesis in one line")
                assert skipped["model"] == SMOL
                assert "skipped gemma3-270m: no live worker" in skipped["reason"]
                assert skipped["fallbacks"] == []
    finally:
        await services.close()
