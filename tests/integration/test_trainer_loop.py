"""The RLHF loop on the real broker: a SmolLM2 worker publishes Rollouts of what it serves, Rewards
arrive for them, the trainer runs a fused PPO iteration on 2 gloo ranks (answering a live prompt
while it scores the batch, then the fused actor+critic pipeline) and announces ModelPublished
together with the Rollout it generated, and the worker hot-loads that version and reports it in
its next responses."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import uuid

import pytest

from infra.connect import connect
from streams.events import envelope, inference_request
from streams.kafka import EventProducer
from streams.replay import read_topics
from tests.conftest import flywheel_env
from tests.integration.conftest import make_settings
from tests.integration.test_worker import decision

pytestmark = [pytest.mark.integration, pytest.mark.model]


@contextlib.contextmanager
def process(args: list[str], prefix: str, **env: str):
    proc = subprocess.Popen([sys.executable, "-m", "flywheel.cli", *args], start_new_session=True,
                            env=flywheel_env(FLYWHEEL_TOPIC_PREFIX=prefix, FLYWHEEL_LOG_LEVEL="WARNING", **env))
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)


async def events_of(services, topic):
    return [(await services.serde.deserialize(r.value))[1] for r in await read_topics(services.kafka, [topic])]


async def wait_for(predicate, timeout_s: float, what: str):
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        result = await predicate()
        if result:
            return result
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(1)


async def test_rollouts_and_rewards_make_a_step_that_workers_hot_load(kafka_broker, postgres):
    prefix = f"rl{uuid.uuid4().hex[:6]}."
    services = await connect(make_settings(topic_prefix=prefix), "rl-test", run_migrations=True, create_topics=True)
    producer = EventProducer(services.kafka, services.serde, services.capabilities)
    await producer.start()
    catalog = services.catalog
    try:
        with process(["worker", "--model", "smollm2-135m", "--worker-id", "rl-1", "--rollout-sample", "1"], prefix), \
                process(["trainer"], prefix, FLYWHEEL_TRAINER_BATCH_SIZE="2", FLYWHEEL_TRAINER_RANKS="2",
                        FLYWHEEL_TRAINER_MICROBATCHES="2", FLYWHEEL_TRAINER_GENERATE="1",
                        FLYWHEEL_TRAINER_MAX_NEW_TOKENS="8", FLYWHEEL_TRAINER_REWARD_TIMEOUT_S="3600"):
            asked = [inference_request(user_id="u", prompt=p, max_tokens=16) for p in ("What is 2+3?", "Name a fruit.")]
            for req in asked:  # the live request stream (the trainer samples prompts from it) ...
                await producer.send_and_wait(catalog.requests, req, key=req["user_id"])
            for req in asked:  # ... and the router's decisions, which the worker serves
                await producer.send_and_wait(catalog.decisions("smollm2-135m"), decision(req), key=req["request_id"])
            rollouts = await wait_for(lambda: _rollouts(services, {r["request_id"] for r in asked}), 240, "rollouts")
            assert all(len(r["token_logprobs"]) == len(r["response_token_ids"]) > 0 for r in rollouts)
            assert all(r["model_version"] == "base" for r in rollouts)
            for i, r in enumerate(rollouts):
                reward = {**envelope(r["request_id"], "t", "u"), "request_id": r["request_id"],
                          "reward": 1.0 if i == 0 else -1.0, "source": "feedback", "feedback_id": None}
                await producer.send_and_wait(catalog.rewards, reward, key=r["request_id"])
            published = await wait_for(lambda: events_of(services, catalog.models_topic), 600, "ModelPublished")
            model = published[-1]
            assert model["model"] == "smollm2-135m" and model["step"] == 1 and len(model["checkpoint_hash"]) == 64
            assert os.path.exists(os.path.join(model["uri"], "model.safetensors"))
            metrics = model["metrics"]
            assert metrics["ranks"] == 2 and metrics["fused"] == 1  # one fused iteration on 2 gloo ranks
            assert metrics["response_tokens"] > 0 and metrics["generated"] == 1
            generated = [e for e in await events_of(services, catalog.rollouts) if e["source"] == "trainer"]
            assert len(generated) == 1 and generated[0]["model_version"] == "base"
            assert generated[0]["prompt"] in {r["prompt"] for r in asked}  # a prompt from the live stream
            assert len(generated[0]["token_logprobs"]) == len(generated[0]["response_token_ids"]) > 0

            async def served_new_version():
                req = inference_request(user_id="u", prompt="Say hi.", max_tokens=8)
                await producer.send_and_wait(catalog.decisions("smollm2-135m"), decision(req), key=req["request_id"])
                await asyncio.sleep(3)
                versions = {e["model_version"] for e in await events_of(services, catalog.responses)
                            if e["request_id"] == req["request_id"]}
                return model["version"] in versions

            assert await wait_for(served_new_version, 180, "a response from the new version")
    finally:
        await producer.stop()
        await services.close()


async def _rollouts(services, wanted: set[str]):
    found = [e for e in await events_of(services, services.catalog.rollouts) if e["request_id"] in wanted]
    return found if len(found) == len(wanted) else None
