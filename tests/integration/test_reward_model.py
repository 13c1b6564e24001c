"""The rewarder's online reward model on real Postgres and Kafka.

In process (real Postgres, a deterministic fake embedder): scripted preferences train it, it
scores only unrated rollouts and only while its held-out accuracy clears the threshold, an example
whose texts never arrive is skipped without blocking the rest, and a restarted learner resumes
with exactly the same weights. Through the real `flywheel rewarder` process (real MiniLM): feedback
over Kafka trains the model until it scores a rollout nobody rated, with ``source="reward_model"``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import uuid
from typing import Any

import numpy as np
import pytest

from agents.rewarder import RewardLearner
from agents.rewarder_store import RewarderStore
from core.reward_model import label_of
from infra.connect import connect
from streams import events
from streams.events import envelope
from streams.kafka import EventProducer
from streams.replay import read_topics
from tests.conftest import flywheel_env
from tests.integration.conftest import make_settings

pytestmark = pytest.mark.integration


class KeywordEmbedder:
    """Deterministic unit vectors: a direction per text (from its hash), pulled strongly along the
    first axis when the text says "good" (the scripted users' taste)."""

    def embed(self, texts: list[str]) -> np.ndarray:
        rows = []
        for text in texts:
            rng = np.random.default_rng(int(hashlib.sha256(text.encode()).hexdigest()[:8], 16))
            v = rng.normal(size=384)
            v[0] += 25.0 if "good" in text else 0.0
            rows.append(v / np.linalg.norm(v))
        return np.asarray(rows, dtype=np.float32)


class Collected:
    """A stand-in producer that keeps what it was asked to send."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    async def send_and_wait(self, topic: str, record: dict[str, Any], key: str | None = None) -> None:
        self.sent.append(record)


def pairwise(user: str, a: str, b: str, winner: str) -> dict[str, Any]:
    return events.feedback(user_id=user, request_id=a, kind="pairwise", pairwise={
        "request_id_a": a, "model_a": "m", "request_id_b": b, "model_b": "m", "winner": winner})


async def shown(store: RewarderStore, rid: str, prompt: str, answer: str, rollout: bool = False) -> None:
    if rollout:
        await store.record_rollout({"request_id": rid, "user_id": "u", "tenant_id": "default", "prompt": prompt,
                                    "response": answer, "model": "m", "model_version": "base"})
    else:
        await store.record_prompt(rid, "u", "default", prompt)
        await store.record_response(rid, "u", answer, "m", "base")


async def teach(store: RewarderStore, n: int, rng: np.random.Generator, honest: bool = True) -> None:
    """``n`` pairwise preferences of users who prefer the good answer (or, not ``honest``, pick at random)."""
    for i in range(n):
        good, bad = (f"{int(rng.integers(1 << 62)):016x}" for _ in range(2))  # seeded: held-out split by id hash
        await shown(store, good, f"question {i}", f"a good answer {i}")
        await shown(store, bad, f"question {i}", f"a poor answer {i}")
        good_first = bool(rng.random() < 0.5)
        a, b = (good, bad) if good_first else (bad, good)
        prefers_good = honest or bool(rng.random() < 0.5)
        winner = "a" if good_first == prefers_good else "b"
        fb = pairwise("u", a, b, winner)
        await store.record_feedback(fb, [a, b], label_of(fb))


async def fold_all(learner: RewardLearner) -> None:
    while await learner.fold():
        pass


@pytest.fixture
def learner_settings(kafka_broker, postgres):
    return make_settings(topic_prefix=f"rm{uuid.uuid4().hex[:6]}.", reward_model_min_heldout=10,
                         reward_model_timeout_s=0.0, reward_join_wait_s=0.0)


async def test_it_learns_scores_only_unrated_rollouts_and_resumes_exactly(services, learner_settings):
    store = RewarderStore(services.pool, learner_settings.topic_prefix)
    learner = RewardLearner(learner_settings, store, "rewards", embedder=KeywordEmbedder())  # type: ignore[arg-type]
    await learner.start()
    await teach(store, 150, np.random.default_rng(0))
    await fold_all(learner)
    accuracy = learner.model.accuracy()
    assert learner.model.seen == 150 and accuracy.balanced is not None and accuracy.balanced >= 0.9
    assert learner.model.usable()

    await shown(store, "rollout-good", "question x", "a good answer x", rollout=True)
    await shown(store, "rollout-bad", "question y", "a poor answer y", rollout=True)
    await shown(store, "rollout-rated", "question z", "a poor answer z", rollout=True)
    rated = events.feedback(user_id="u", request_id="rollout-rated", kind="thumbs", thumbs_up=False)
    await store.record_feedback(rated, ["rollout-rated"], label_of(rated))
    producer = Collected()
    assert await learner.score_expired(producer) == 2
    rewards = {e["request_id"]: e for e in producer.sent}
    assert set(rewards) == {"rollout-good", "rollout-bad"}  # the rated rollout has its user's reward
    assert {e["source"] for e in rewards.values()} == {"reward_model"}
    # Pairwise preferences fix score differences, not levels (Bradley-Terry is shift-invariant),
    # so what they teach is the order of the two answers, not the sign of either reward.
    assert rewards["rollout-good"]["reward"] > rewards["rollout-bad"]["reward"]
    assert await learner.score_expired(producer) == 0 and len(producer.sent) == 2  # each rollout once

    await teach(store, 30, np.random.default_rng(1))  # after the snapshot: a restart replays these
    await fold_all(learner)
    again = RewardLearner(learner_settings, store, "rewards", embedder=KeywordEmbedder())  # type: ignore[arg-type]
    await again.start()
    await fold_all(again)
    assert again.model.seen == learner.model.seen == 181  # 150 + the rated rollout + 30
    assert np.array_equal(again.model.weights, learner.model.weights)
    assert again.model.accuracy() == learner.model.accuracy()


async def test_below_the_threshold_no_reward_is_made_up(services, learner_settings):
    store = RewarderStore(services.pool, learner_settings.topic_prefix)
    learner = RewardLearner(learner_settings, store, "rewards", embedder=KeywordEmbedder())  # type: ignore[arg-type]
    await teach(store, 150, np.random.default_rng(2), honest=False)  # coin-flip users: nothing to learn
    await fold_all(learner)
    balanced = learner.model.accuracy().balanced
    assert balanced is not None and balanced < learner_settings.reward_model_min_accuracy
    await shown(store, "unrated", "question", "a good answer", rollout=True)
    producer = Collected()
    assert await learner.score_expired(producer) == 0 and producer.sent == []
    await learner.publish_figures()
    row = await services.pool.fetchrow("SELECT * FROM reward_model_state WHERE deployment = $1", store.deployment)
    assert row["usable"] is False and row["examples"] == 150 and row["accuracy"] == pytest.approx(balanced)


async def test_an_example_whose_texts_never_arrive_is_skipped_not_blocking(services, learner_settings):
    store = RewarderStore(services.pool, learner_settings.topic_prefix)
    learner = RewardLearner(learner_settings, store, "rewards", embedder=KeywordEmbedder())  # type: ignore[arg-type]
    ghost = events.feedback(user_id="u", request_id="never-seen", kind="thumbs", thumbs_up=True)
    await store.record_feedback(ghost, ["never-seen"], label_of(ghost))
    await teach(store, 5, np.random.default_rng(3))
    await fold_all(learner)
    assert learner.skipped == 1 and learner.model.seen == 5
    row = await services.pool.fetchrow("SELECT status, reason FROM reward_examples WHERE deployment = $1 "
                                       "AND feedback_id = $2", store.deployment, ghost["event_id"])
    assert row["status"] == "unjoinable" and "never-seen" in row["reason"]


@contextlib.contextmanager
def rewarder(prefix: str, **env: str):
    proc = subprocess.Popen([sys.executable, "-m", "flywheel.cli", "rewarder"], start_new_session=True,
                            env=flywheel_env(FLYWHEEL_TOPIC_PREFIX=prefix, FLYWHEEL_LOG_LEVEL="WARNING", **env))
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)


@pytest.mark.model
async def test_the_rewarder_process_learns_from_feedback_and_scores_an_unrated_rollout(kafka_broker, postgres):
    prefix = f"rp{uuid.uuid4().hex[:6]}."
    services = await connect(make_settings(topic_prefix=prefix), "rm-test", run_migrations=True, create_topics=True)
    producer = EventProducer(services.kafka, services.serde, services.capabilities)
    await producer.start()
    catalog = services.catalog
    capitals = [("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Egypt", "Cairo"),
                ("Peru", "Lima"), ("Canada", "Ottawa"), ("Greece", "Athens"), ("Norway", "Oslo"), ("Cuba", "Havana")]
    garbage = ["<sT>aT>r>e", "]]]] ]]]]", "a a a a a a a", "?!?! ..--..", "<|im_start|><|im_start|>"]

    async def served(prompt: str, text: str, rollout: bool = False) -> str:
        request = events.inference_request(user_id="u", prompt=prompt)
        rid = request["request_id"]
        await producer.send_and_wait(catalog.requests, request, key="u")
        response = {**envelope(rid, "default", "u"), "request_id": rid, "model": "smollm2-135m",
                    "model_version": "base", "adapter_version": None, "text": text, "prompt_tokens": 8,
                    "completion_tokens": 8, "queue_ms": 0.0, "first_token_ms": 1.0, "total_ms": 2.0,
                    "finish_reason": "stop", "worker_id": "w", "cost_usd": 0.0, "error": None}
        await producer.send_and_wait(catalog.responses, response, key=rid)
        if rollout:
            await producer.send_and_wait(catalog.rollouts, {
                **envelope(rid, "default", "u"), "request_id": rid, "model": "smollm2-135m", "model_version": "base",
                "prompt": prompt, "response": text, "prompt_token_ids": [1, 2], "response_token_ids": [3, 4],
                "token_logprobs": [-0.1, -0.2], "source": "live"}, key=rid)
        return rid

    env = {"FLYWHEEL_REWARD_MODEL_MIN_HELDOUT": "5", "FLYWHEEL_REWARD_MODEL_TIMEOUT_S": "0",
           "FLYWHEEL_REWARD_JOIN_WAIT_S": "60"}
    try:
        with rewarder(prefix, **env):
            rng = np.random.default_rng(0)
            for i in range(60):
                country, capital = capitals[i % len(capitals)]
                prompt = f"What is the capital city of {country}?"
                good = await served(prompt, f"The capital of {country} is {capital}.")
                bad = await served(prompt, garbage[i % len(garbage)])
                a, b = (good, bad) if rng.random() < 0.5 else (bad, good)
                fb = pairwise("u", a, b, "a" if a == good else "b")
                await producer.send_and_wait(catalog.feedback, fb, key="u")

            async def usable() -> bool:
                row = await services.pool.fetchrow("SELECT usable, examples FROM reward_model_state "
                                                   "WHERE deployment = $1", prefix)
                return bool(row and row["usable"] and row["examples"] == 60)

            await wait_until(usable, 300, "the reward model to learn the preferences")
            good_rollout = await served("What is the capital city of Chile?", "The capital of Chile is Santiago.",
                                        rollout=True)
            bad_rollout = await served("What is the capital city of Chile?", "<sT>aT>r>e ]]]]", rollout=True)

            async def model_rewards() -> dict[str, float]:
                found = {e["request_id"]: e["reward"] for e in await decoded(services, catalog.rewards)
                         if e["source"] == "reward_model"}
                return found if {good_rollout, bad_rollout} <= set(found) else {}

            rewards = await wait_until(model_rewards, 120, "model rewards for the unrated rollouts")
            assert rewards[good_rollout] > rewards[bad_rollout]
            feedback_rewards = [e for e in await decoded(services, catalog.rewards) if e["source"] == "feedback"]
            assert len(feedback_rewards) == 120  # every preference rewards both answers
    finally:
        await producer.stop()
        await services.close()


async def decoded(services, topic: str) -> list[dict[str, Any]]:
    return [(await services.serde.deserialize(r.value))[1] for r in await read_topics(services.kafka, [topic])]


async def wait_until(predicate, timeout_s: float, what: str) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        result = await predicate()
        if result:
            return result
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(1)
