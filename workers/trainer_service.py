"""The trainer consumer: Rollouts and Rewards in, PPO steps, ModelPublished out.

Workers publish a sample of served responses as Rollouts (token ids and log-probs included); the
rewarder turns users' feedback into Rewards; rollouts nobody rated within the timeout are scored
by the reward model. Every ``batch_size`` rewarded rollouts make one PPO step (``Trainer``), whose
checkpoint (merged LoRA weights, content-addressed) is announced on the compacted models topic,
which workers hot-load.

Delivery: a rollout or reward is "finished" once the step that used it was published (or it was
dropped as a duplicate or stale); offsets are committed with ``streams.offsets.OffsetTracker``
in the same transaction as the ModelPublished event, so a crash loses no rollout and trains on
none twice. On restart the trainer resumes from the newest published checkpoint of its model.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from aiokafka import ConsumerRebalanceListener, TopicPartition

from infra.connect import Services
from infra.telemetry import TRAINER_REWARD, TRAINER_STEPS
from streams.dlq import DeadLetters
from streams.events import envelope
from streams.kafka import EventConsumer, EventProducer, Received, fetch_committed
from streams.offsets import OffsetTracker
from streams.replay import read_topics
from workers.trainer.batch import Rollout
from workers.trainer.checkpoint import read_checkpoint
from workers.trainer.trainer import StepResult, Trainer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainerServiceConfig:
    model: str = "smollm2-135m"
    """The model whose policy is trained (rollouts of other models are ignored)."""
    score_every_s: float = 5.0


def resume_actor(actor: torch.nn.Module, checkpoint_dir: Path) -> None:
    """Load a published checkpoint (base-model names) into a possibly peft-wrapped actor.

    A LoRA actor's checkpoint holds merged weights (W + BA); they go into the wrapped layers'
    ``base_layer`` while the fresh LoRA starts at zero, so the actor equals the published policy.
    """
    _, weights = read_checkpoint(checkpoint_dir)
    params = actor.state_dict(keep_vars=True)
    with torch.no_grad():
        for name, tensor in weights.items():
            stem = name[: -len(".weight")] if name.endswith(".weight") else name
            for candidate in (name, f"base_model.model.{name}", f"base_model.model.{stem}.base_layer.weight"):
                if candidate in params and params[candidate].shape == tensor.shape:
                    params[candidate].copy_(tensor)
                    break
            else:
                raise KeyError(f"checkpoint tensor {name} has no place in the actor")


class TrainerService:
    def __init__(self, services: Services, trainer: Trainer, config: TrainerServiceConfig) -> None:
        self.s = services
        self.trainer = trainer
        self.config = config
        catalog = services.catalog
        self.topics = [catalog.rollouts, catalog.rewards]
        self.group = f"{services.settings.topic_prefix}flywheel-trainer"
        self.consumer = EventConsumer(services.kafka, services.serde, [], group_id=self.group,
                                      capabilities=services.capabilities, max_poll_interval_ms=1_800_000)
        self.producer = EventProducer(services.kafka, services.serde, services.capabilities,
                                      transactional_id=f"{self.group}-0")
        self.plain = EventProducer(services.kafka, services.serde, services.capabilities)
        self.dlq = DeadLetters(self.plain, catalog.dlq("trainer"), "trainer")
        self.tracker = OffsetTracker()
        self.held: dict[str, list[tuple[TopicPartition, int]]] = {}
        self.txn_lock = asyncio.Lock()
        self.stop = asyncio.Event()
        self.steps_published = 0

    async def resume(self) -> None:
        """Continue from the newest checkpoint of our model on the models topic, if any."""
        latest: dict[str, Any] | None = None
        for r in await read_topics(self.s.kafka, [self.s.catalog.models_topic]):
            _, event = await self.s.serde.deserialize(r.value)
            if event["model"] == self.config.model and (latest is None or event["step"] >= latest["step"]):
                latest = event
        if latest is None:
            return
        path = Path(latest["uri"])
        if not path.exists():
            log.warning("newest checkpoint %s is not on this host (%s); training from the base",
                        latest["version"], path)
            return
        resume_actor(self.trainer.models.actor, path)
        self.trainer.step_count = int(latest["step"])
        self.trainer.versions.append(latest["version"])
        log.info("resumed from %s (step %d)", latest["version"], latest["step"])

    def _rollout(self, event: dict[str, Any]) -> Rollout | None:
        if event["model"] != self.config.model or not event["response_token_ids"] or not event["prompt_token_ids"]:
            return None
        return Rollout(request_id=event["request_id"], prompt_token_ids=tuple(event["prompt_token_ids"]),
                       response_token_ids=tuple(event["response_token_ids"]),
                       response_logprobs=tuple(float(x) for x in event["token_logprobs"]),
                       model_version=event["model_version"], prompt=event["prompt"], response=event["response"],
                       user_id=event["user_id"])

    def _still_held(self) -> set[str]:
        return self.trainer.buffer.held()

    async def _ingest(self, batch: list[Received]) -> None:
        for item in batch:
            r, tp = item.record, item.tp
            if self.tracker.is_done(tp, r.offset):
                self.tracker.seen_offset(tp, r.offset, open_=False)
                continue
            if item.error is not None or item.event is None:
                await self.dlq.publish(topic=r.topic, partition=r.partition, offset=r.offset, key=r.key,
                                       value=r.value, headers=item.headers, error=item.error or ValueError("no event"))
                self.tracker.seen_offset(tp, r.offset, open_=False)
                continue
            event = item.event
            held = False
            try:
                if r.topic == self.s.catalog.rollouts:
                    rollout = self._rollout(event)
                    held = rollout is not None and self.trainer.add_rollout(rollout)
                else:
                    self.trainer.add_reward(event["request_id"], float(event["reward"]))
                    held = True
            except ValueError as exc:  # a malformed rollout (e.g. log-probs of the wrong length)
                await self.dlq.publish(topic=r.topic, partition=r.partition, offset=r.offset, key=r.key,
                                       value=r.value, headers=item.headers, error=exc, event=event)
            self.tracker.seen_offset(tp, r.offset, open_=held)
            if held:
                self.held.setdefault(event["request_id"], []).append((tp, r.offset))

    def _release_finished(self) -> None:
        keep = self._still_held()
        for rid in [rid for rid in self.held if rid not in keep]:
            for tp, offset in self.held.pop(rid):
                self.tracker.close(tp, offset)

    async def _publish(self, result: StepResult | None) -> None:
        """ModelPublished (if a step ran) and the offsets it finished, atomically."""
        async with self.txn_lock:
            self._release_finished()
            positions = self.tracker.positions()
            if result is None and not positions:
                return
            record = None
            if result is not None and result.checkpoint_dir is not None and result.digest is not None:
                record = {**envelope(result.version, "system", "trainer"), "model": self.config.model,
                          "version": result.version, "checkpoint_hash": result.digest,
                          "uri": str(result.checkpoint_dir.resolve()), "step": result.step,
                          "parent_version": self.trainer.versions[-2] if len(self.trainer.versions) > 1 else None,
                          "metrics": {k: float(v) for k, v in result.metrics.items()}}
            if self.producer.transactional:
                async with self.producer.raw.transaction():
                    if record is not None:
                        await self.producer.send(self.s.catalog.models_topic, record, key=self.config.model)
                    if positions:
                        await self.producer.raw.send_offsets_to_transaction(positions, self.group)
            else:
                if record is not None:
                    await self.producer.send_and_wait(self.s.catalog.models_topic, record, key=self.config.model)
                if positions:
                    await self.consumer.commit(positions)
            self.tracker.mark_committed(positions)

    async def train_when_ready(self) -> None:
        self.trainer.expire()
        while self.trainer.ready():
            started = time.monotonic()
            result = await asyncio.to_thread(self.trainer.step)
            self.steps_published += 1
            TRAINER_STEPS.inc()
            if "score_mean" in result.metrics:
                TRAINER_REWARD.set(result.metrics["score_mean"])
            log.info("PPO step %d (%s) in %.1fs: %s", result.step, result.version, time.monotonic() - started,
                     {k: round(v, 4) for k, v in result.metrics.items() if k in ("score_mean", "kl_mean",
                                                                                   "policy_loss", "value_loss")})
            await self._publish(result)
        await self._publish(None)

    async def run(self) -> None:
        await self.producer.start()
        await self.plain.start()
        await self.resume()
        service = self

        class Listener(ConsumerRebalanceListener):
            async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
                async with service.txn_lock:
                    service.tracker.forget(set(revoked))

            async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
                committed = await fetch_committed(service.s.kafka, service.group, set(assigned))
                async with service.txn_lock:
                    for tp, (offset, metadata) in committed.items():
                        service.tracker.restore(tp, offset, metadata)

        self.consumer.raw.subscribe(self.topics, listener=Listener())
        await self.consumer.start()
        last_score = time.monotonic()
        try:
            batches = self.consumer.batches(timeout_ms=500, max_records=200)
            while not self.stop.is_set():
                batch = await anext(batches)
                if batch:
                    await self._ingest(batch)
                if batch or time.monotonic() - last_score > self.config.score_every_s:
                    await self.train_when_ready()
                    last_score = time.monotonic()
        finally:
            with contextlib.suppress(Exception):
                await self.consumer.stop()
            await self.producer.stop()
            await self.plain.stop()
