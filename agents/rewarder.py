"""The rewarder agent: Feedback -> Reward events for the trainer, and an online reward model that
scores the rollouts nobody rated.

    feedback --(rule in core.rewards)--> rewards (source "feedback"), in the feedback's transaction
    feedback --(core.reward_model.label_of)--> reward_examples (Postgres), in topic order
    requests, responses, rollouts --> reward_texts (the join: prompt and response per request)
    learner task: examples + texts --(MiniLM features, core.reward_model)--> the reward model;
                  rollouts unrated for FLYWHEEL_REWARD_MODEL_TIMEOUT_S --> rewards (source "reward_model"),
                  of a model only while the reward model's held-out accuracy on that model's answers
                  (less two standard errors) >= FLYWHEEL_REWARD_MODEL_MIN_ACCURACY

Reward event ids are derived from the feedback's event id (or, for model rewards, the request id),
so re-processing (at-least-once on Tansu, a replay, a restart) produces the same ids. The model is
a pure function of the ordered examples; its snapshot and the last folded example are kept in
``reward_model_state`` so a restarted rewarder resumes exactly where it was. No reward is ever made
up: below the accuracy threshold unrated rollouts get no reward at all.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
from typing import Any, Protocol

import faust
import numpy as np

from agents.base import (
    FaustSink,
    crash_process_on_error,
    decode,
    exits_on_error,
    make_app,
    process_each,
    raw_topic,
    run_agent_process,
)
from agents.rewarder_store import ExampleRow, RewarderStore, UnscoredRollout
from core.embedding import EMBEDDING_DIM, Embedder, get_embedder
from core.errors import ValidationError
from core.reward_model import Example, RewardModel, RewardModelConfig, feature_dim, label_of, response_features
from core.rewards import rewards_from_feedback
from infra.connect import Services
from infra.settings import Settings
from infra.telemetry import REWARD_EXAMPLES, REWARD_MODEL_ACCURACY, REWARD_MODEL_USABLE, REWARDS_PUBLISHED
from streams.dlq import DeadLetters
from streams.events import envelope, event_time_ms, prompt_text
from streams.kafka import EventProducer

log = logging.getLogger(__name__)
SNAPSHOT_EVERY = 100
"""Examples folded between snapshots of the model (a restart replays at most this many)."""
LEARN_INTERVAL_S = 1.0
TEXTS_RETENTION_S = 7 * 24 * 3600.0
"""The join keeps a request's texts as long as the topics keep the request (7 days)."""


def reward_events(feedback: dict[str, Any]) -> list[dict[str, Any]]:
    """The Reward events for one Feedback event (pure; deterministic ids and times)."""
    out = []
    for assignment in rewards_from_feedback(feedback):
        event_id = hashlib.sha256(f"{feedback['event_id']}:{assignment.request_id}".encode()).hexdigest()[:32]
        out.append({
            "event_id": event_id,
            "correlation_id": assignment.request_id,
            "tenant_id": feedback["tenant_id"],
            "user_id": feedback["user_id"],
            "event_time": event_time_ms(feedback),
            "request_id": assignment.request_id,
            "reward": assignment.reward,
            "source": "feedback",
            "feedback_id": feedback["event_id"],
        })
    return out


def model_reward_event(rollout: UnscoredRollout, reward: float) -> dict[str, Any]:
    """The Reward the reward model gives a rollout nobody rated (one per request id)."""
    event_id = hashlib.sha256(f"reward_model:{rollout.request_id}".encode()).hexdigest()[:32]
    return {**envelope(rollout.request_id, rollout.tenant_id, rollout.user_id, event_id=event_id),
            "request_id": rollout.request_id, "reward": float(reward), "source": "reward_model",
            "feedback_id": None}


class RewardSink(Protocol):
    """Where model rewards go (an ``EventProducer``)."""

    async def send_and_wait(self, topic: str, record: dict[str, Any], key: str | None = None) -> Any: ...


def model_config(settings: Settings) -> RewardModelConfig:
    return RewardModelConfig(dim=feature_dim(EMBEDDING_DIM), min_heldout=settings.reward_model_min_heldout,
                             min_accuracy=settings.reward_model_min_accuracy)


class RewardLearner:
    """Folds feedback examples into the reward model in order; scores rollouts nobody rated."""

    def __init__(self, settings: Settings, store: RewarderStore, rewards_topic: str,
                 embedder: Embedder | None = None) -> None:
        self.settings = settings
        self.store = store
        self.rewards_topic = rewards_topic
        self.config = model_config(settings)
        self.model = RewardModel(self.config)
        self._embedder = embedder
        self.last_seq = 0
        self.snapshot_seq = 0
        self.skipped = 0
        self.scored = 0

    async def embed(self, texts: list[str]) -> np.ndarray:
        if self._embedder is None:
            self._embedder = await asyncio.to_thread(get_embedder)
        return await asyncio.to_thread(self._embedder.embed, texts)

    async def features(self, pairs: list[tuple[str, str]]) -> np.ndarray:
        """Features of (prompt, response) pairs."""
        prompts = await self.embed([p for p, _ in pairs])
        responses = await self.embed([r for _, r in pairs])
        return response_features(prompts, responses, [r for _, r in pairs])

    async def start(self) -> None:
        """Resume from the stored snapshot (examples after it are folded again by :meth:`fold`)."""
        last_seq, snapshot, self.scored = await self.store.load_state()
        if snapshot is None:
            return
        wanted = [*snapshot["model"]["train_buffer"], *snapshot["model"]["heldout"]]
        rows = await self.store.examples_by_id(wanted)
        examples = {fid: Example(fid, row.label, row.features, row.scope) for fid, row in rows.items()
                    if row.features is not None}
        self.model = RewardModel.restore(self.config, snapshot["model"], examples)
        self.skipped = int(snapshot["skipped"])
        self.last_seq = self.snapshot_seq = last_seq
        log.info("reward model resumed after example %d (%d folded)", last_seq, self.model.seen)

    async def _settle(self, row: ExampleRow) -> ExampleRow | None:
        """Join a waiting example with its texts (or give up after the join wait); None: keep waiting."""
        texts = await self.store.texts(list(row.label.request_ids))
        if all(rid in texts for rid in row.label.request_ids):
            phi = await self.features([(texts[r].prompt, texts[r].response) for r in row.label.request_ids])
            example = Example.of(row.feedback_id, row.label, list(phi), [texts[r].model for r in row.label.request_ids])
            return await self.store.decide(row.feedback_id, example.features, None, example.scope)
        if row.age_s >= self.settings.reward_join_wait_s:
            missing = [r for r in row.label.request_ids if r not in texts]
            return await self.store.decide(row.feedback_id, None,
                                           f"the texts of {missing} were not seen within "
                                           f"{self.settings.reward_join_wait_s:g}s")
        return None

    async def fold(self) -> int:
        """Fold the decided examples after the last one, in order; returns how many."""
        folded = 0
        for fetched in await self.store.examples_after(self.last_seq):
            row = await self._settle(fetched) if fetched.status == "waiting" else fetched
            if row is None:
                break  # the order is the contract: later examples wait for this one
            if row.status == "joined" and row.features is not None:
                self.model.update(Example(row.feedback_id, row.label, row.features, row.scope))
                REWARD_EXAMPLES.labels("joined").inc()
            else:
                self.skipped += 1
                REWARD_EXAMPLES.labels("unjoinable").inc()
            self.last_seq = row.seq
            folded += 1
        if self.last_seq - self.snapshot_seq >= SNAPSHOT_EVERY or (folded and not self.snapshot_seq):
            await self.store.save_snapshot(self.last_seq, {"model": self.model.state(), "skipped": self.skipped})
            state = self.model.state()
            await self.store.prune_examples([*state["train_buffer"], *state["heldout"]], self.last_seq)
            self.snapshot_seq = self.last_seq
        return folded

    def trusted_for(self) -> list[str]:
        """The models whose rollouts the reward model may score now (its gate, per model)."""
        return [m for m in self.model.scopes() if self.model.usable(m)]

    async def score_expired(self, producer: RewardSink) -> int:
        """Score rollouts nobody rated within the timeout, of the models it is trusted for; returns
        how many."""
        models = self.trusted_for()
        if not models:
            return 0

        async def score(rollouts: list[UnscoredRollout]) -> None:
            rewards = self.model.rewards(await self.features([(r.prompt, r.response) for r in rollouts]))
            for rollout, reward in zip(rollouts, rewards, strict=True):
                event = model_reward_event(rollout, reward)
                await producer.send_and_wait(self.rewards_topic, event, key=rollout.request_id)
            REWARDS_PUBLISHED.labels("reward_model").inc(len(rollouts))

        done = await self.store.score_pass(models, self.settings.reward_model_timeout_s,
                                           self.settings.trainer_reward_timeout_s, score)
        self.scored += done
        return done

    async def publish_figures(self) -> None:
        accuracy = self.model.accuracy()
        per_model = {}
        REWARD_MODEL_ACCURACY.labels("all").set(math.nan if accuracy.balanced is None else accuracy.balanced)
        for model in self.model.scopes():
            own = self.model.accuracy(model)
            usable = self.model.usable(model)
            per_model[model] = {"accuracy": own.balanced, "heldout": own.heldout, "usable": usable}
            REWARD_MODEL_ACCURACY.labels(model).set(math.nan if own.balanced is None else own.balanced)
            REWARD_MODEL_USABLE.labels(model).set(int(usable))
        await self.store.save_figures(accuracy=accuracy.balanced, heldout=accuracy.heldout,
                                      examples=self.model.seen, skipped=self.skipped,
                                      usable=any(v["usable"] for v in per_model.values()),
                                      threshold=self.config.min_accuracy, scored=self.scored, per_model=per_model)

    async def run(self, services: Services) -> None:
        """Learn and score until cancelled."""
        producer = EventProducer(services.kafka, services.serde, services.capabilities)
        await producer.start()
        try:
            await self.start()
            await self.publish_figures()
            rounds = 0
            while True:
                changed = await self.fold()
                changed += await self.score_expired(producer)
                if changed:
                    await self.publish_figures()
                rounds += 1
                if rounds % 3600 == 0:
                    await self.store.prune_texts(TEXTS_RETENTION_S)
                await asyncio.sleep(LEARN_INTERVAL_S)
        finally:
            await producer.stop()


def build(services: Services) -> faust.App:
    app = make_app("rewarder", services)
    sink = FaustSink(app, services)
    dlq = DeadLetters(sink, services.catalog.dlq("rewarder"), "rewarder")  # type: ignore[arg-type]
    catalog = services.catalog
    store = RewarderStore(services.pool, services.settings.topic_prefix)
    learner = RewardLearner(services.settings, store, catalog.rewards)

    @app.task
    async def start_learner() -> None:
        task = asyncio.create_task(learner.run(services), name="reward-learner")
        task.add_done_callback(crash_process_on_error)

    @app.agent(raw_topic(app, catalog.requests), name="requests-to-texts")
    @exits_on_error
    async def requests_to_texts(stream: Any) -> None:
        async for event in stream.events():
            request = await decode(services, event, dlq)
            if request is not None:
                await store.record_prompt(request["request_id"], request["user_id"], request["tenant_id"],
                                          prompt_text(request))

    @app.agent(raw_topic(app, catalog.responses), name="responses-to-texts")
    @exits_on_error
    async def responses_to_texts(stream: Any) -> None:
        async for event in stream.events():
            response = await decode(services, event, dlq)
            if response is not None and not response.get("error"):
                await store.record_response(response["request_id"], response["user_id"], response["text"],
                                            response["model"], response.get("model_version"))

    @app.agent(raw_topic(app, catalog.rollouts), name="rollouts-to-texts")
    @exits_on_error
    async def rollouts_to_texts(stream: Any) -> None:
        async for event in stream.events():
            rollout = await decode(services, event, dlq)
            if rollout is not None:
                await store.record_rollout(rollout)

    @app.agent(raw_topic(app, catalog.feedback), name="feedback-to-rewards")
    @exits_on_error
    async def feedback_to_rewards(stream: Any) -> None:
        async def handle(feedback: dict[str, Any]) -> None:
            rewards = reward_events(feedback)  # invalid feedback raises: a dead letter with the reason
            try:
                label = label_of(feedback)
            except ValueError as exc:
                raise ValidationError(f"feedback {feedback['event_id']}: {exc}") from exc
            for reward in rewards:
                await sink.send(catalog.rewards, reward, key=reward["request_id"])
            REWARDS_PUBLISHED.labels("feedback").inc(len(rewards))
            await store.record_feedback(feedback, [r["request_id"] for r in rewards], label)

        await process_each(stream, services, dlq, handle)

    return app


def main(settings: Settings) -> int:
    return run_agent_process("rewarder", settings, build)

