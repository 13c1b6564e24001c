"""The inference worker on the real broker with the real SmolLM2: answers, streaming, a SIGKILL in
the middle of a batch after which every request still gets exactly one final response, and
admission control at overload (rejections with their reason, everything admitted answered)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter

import pytest

from infra.connect import connect
from streams.events import envelope, inference_request
from streams.kafka import EventProducer
from streams.replay import read_topics
from tests.conftest import flywheel_env
from tests.integration.conftest import make_settings

pytestmark = [pytest.mark.integration, pytest.mark.model]
MODEL = "smollm2-135m"
PROMPTS = ["What is 2+3?", "Name a fruit.", "Say hello in French.", "What color is the sky?",
           "Count to five.", "What is the capital of Italy?", "Give one word that rhymes with cat.",
           "What is 10 minus 4?", "Name a planet.", "What do bees make?", "Spell the word dog.",
           "What is the opposite of hot?"]


def decision(request: dict) -> dict:
    return {**envelope(request["request_id"], request["tenant_id"], request["user_id"]), "request": request,
            "model": MODEL, "candidates": [], "fallbacks": [], "router_name": "test", "router_version": "0",
            "reason": "test", "feedback_offset": -1}


def start_worker(prefix: str, worker_id: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "flywheel.cli", "worker", "--model", MODEL,
                             "--worker-id", worker_id],
                            env=flywheel_env(FLYWHEEL_TOPIC_PREFIX=prefix, FLYWHEEL_LOG_LEVEL="WARNING"),
                            start_new_session=True)


async def finals_by_request(services) -> Counter:
    records = await read_topics(services.kafka, [services.catalog.responses])
    counts: Counter = Counter()
    for r in records:
        _, event = await services.serde.deserialize(r.value)
        counts[event["request_id"]] += 1
    return counts


async def test_worker_survives_sigkill_mid_batch_with_exactly_one_final_each(kafka_broker, postgres):
    prefix = f"worker{uuid.uuid4().hex[:6]}."
    services = await connect(make_settings(topic_prefix=prefix), "worker-test", run_migrations=True,
                             create_topics=True)
    producer = EventProducer(services.kafka, services.serde, services.capabilities)
    await producer.start()
    proc = start_worker(prefix, "w-a")
    try:
        requests = [inference_request(user_id=f"user-{i % 3}", prompt=p, max_tokens=48) for i, p in enumerate(PROMPTS)]
        for req in requests:
            await producer.send_and_wait(services.catalog.decisions(MODEL), decision(req), key=req["request_id"])
        # wait until generation is under way (chunks flowing, not all finals yet), then SIGKILL
        deadline = asyncio.get_running_loop().time() + 180
        while True:
            chunks = await read_topics(services.kafka, [services.catalog.chunks])
            done = await finals_by_request(services)
            if chunks and len(done) < len(requests):
                break
            assert asyncio.get_running_loop().time() < deadline, "the worker never started generating"
            await asyncio.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        killed_with = len(done)
        proc = start_worker(prefix, "w-a")
        while len(done) < len(requests):
            assert asyncio.get_running_loop().time() < deadline + 180, f"only {len(done)} of {len(requests)} answered"
            await asyncio.sleep(1)
            done = await finals_by_request(services)
        assert killed_with < len(requests)
        assert set(done) == {r["request_id"] for r in requests}
        assert all(count == 1 for count in done.values()), done  # read_committed: exactly one final
        # answers come from the real model and carry its identity and token counts
        records = await read_topics(services.kafka, [services.catalog.responses])
        events = [(await services.serde.deserialize(r.value))[1] for r in records]
        assert all(e["model"] == MODEL and e["completion_tokens"] > 0 and e["text"].strip() for e in events)
        assert all(e["user_id"] == next(r["user_id"] for r in requests if r["request_id"] == e["request_id"])
                   for e in events)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
        await producer.stop()
        await services.close()


async def test_worker_at_overload_rejects_what_it_cannot_serve_in_time_and_answers_the_rest(kafka_broker, postgres):
    """A burst of requests, some of which cannot possibly meet their deadline: those get an immediate
    ``deadline`` final with the reason; everything admitted is answered; nothing is lost or doubled."""
    prefix = f"overload{uuid.uuid4().hex[:6]}."
    services = await connect(make_settings(topic_prefix=prefix), "worker-test", run_migrations=True,
                             create_topics=True)
    producer = EventProducer(services.kafka, services.serde, services.capabilities)
    await producer.start()
    proc = subprocess.Popen([sys.executable, "-m", "flywheel.cli", "worker", "--model", MODEL, "--worker-id", "w-o",
                             "--policy", "slo_goodput"],
                            env=flywheel_env(FLYWHEEL_TOPIC_PREFIX=prefix, FLYWHEEL_LOG_LEVEL="WARNING",
                                             FLYWHEEL_WORKER_SHORTEN_MIN_TOKENS="0"),
                            start_new_session=True)
    try:
        now_ms = int(time.time() * 1000)
        hopeless = [inference_request(user_id=f"u{i}", prompt=p, max_tokens=48, deadline_ms=now_ms - 1)
                    for i, p in enumerate(PROMPTS[:5])]
        feasible = [inference_request(user_id=f"u{i}", prompt=p, max_tokens=32, deadline_ms=now_ms + 600_000)
                    for i, p in enumerate(PROMPTS[5:])]
        requests = hopeless + feasible
        for req in requests:  # one burst, interleaved
            await producer.send_and_wait(services.catalog.decisions(MODEL), decision(req), key=req["request_id"])
        deadline = asyncio.get_running_loop().time() + 420
        done = await finals_by_request(services)
        while len(done) < len(requests):
            assert asyncio.get_running_loop().time() < deadline, f"only {len(done)} of {len(requests)} answered"
            await asyncio.sleep(1)
            done = await finals_by_request(services)
        assert set(done) == {r["request_id"] for r in requests}
        assert all(count == 1 for count in done.values()), done  # nothing lost, nothing doubled
        records = await read_topics(services.kafka, [services.catalog.responses])
        finals = {e["request_id"]: e for e in [(await services.serde.deserialize(r.value))[1] for r in records]}
        for req in hopeless:
            f = finals[req["request_id"]]
            assert f["finish_reason"] == "deadline" and f["text"] == "" and f["completion_tokens"] == 0
            assert f["admission"] and "cannot meet its deadline" in f["admission"], f
        for req in feasible:  # admitted: answered in full by the real model
            f = finals[req["request_id"]]
            assert f["finish_reason"] in ("stop", "length") and f["text"].strip() and f["completion_tokens"] > 0
            assert f["admission"] is None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
        await producer.stop()
        await services.close()
