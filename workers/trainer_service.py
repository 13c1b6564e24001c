"""The trainer consumer: Rollouts and Rewards in, fused PPO iterations, ModelPublished out.

Workers publish a sample of served responses as Rollouts (token ids, behaviour log-probs, the
version and adapter that served them); the rewarder turns users' feedback (and, for unrated
rollouts, its trained reward model) into Rewards. The trainer also reads the tail of the request
stream for prompts. Every ``batch_size`` rewarded rollouts make one live iteration
(``workers.trainer.live``: fused generation + inference and the fused actor+critic pipeline on
gloo ranks); its checkpoint is announced on the compacted models topic, which workers hot-load,
and the samples it generated go out as Rollouts (``source = "trainer"``) to be rewarded. Rollouts
that no Reward reaches within the timeout are dropped and counted: nothing here scores them.

Delivery: a rollout or reward is "finished" once the step that used it was published (or it was
dropped: duplicate, stale, excluded, expired); offsets are committed with
``streams.offsets.OffsetTracker`` in the same transaction as the ModelPublished event and the
generated Rollouts, so a crash (even mid-iteration) loses no rollout, trains on none twice and
publishes no half-step: the redelivered events are trained again from the last published
checkpoint, which the trainer resumes from (its trainer state restores the exact policy).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiokafka import TopicPartition

from core.rlhf.buffer import Rollout, RolloutBuffer
from core.scheduling.yielding import BackoffConfig
from infra.connect import Services
from infra.telemetry import TRAINER_REWARD, TRAINER_STEPS
from infra.yielding import ServingPressureWatcher, run_as_background
from streams.dlq import DeadLetters
from streams.events import envelope, prompt_text
from streams.kafka import EventConsumer, EventProducer, Received, fetch_committed, partitions_of
from streams.replay import read_topics
from streams.stage_loop import Output, StageConfig, StageLoop
from workers.trainer.live import LiveStep, LiveTrainer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainerServiceConfig:
    model: str = "smollm2-135m"
    """The model whose policy is trained (rollouts of other models are ignored)."""
    tick_s: float = 2.0
    """How often expiry and readiness are checked when no event arrives."""
    prompt_tail: int = 256
    """Requests per partition read back at start-up to fill the prompt pool."""
    yield_to_serving: bool = True
    """Run at low CPU priority and wait (bounded) before each PPO step while workers hold requests."""


def rollout_from_event(event: dict[str, Any]) -> Rollout:
    """A Rollout event as the buffer holds it (raises ValueError when malformed)."""
    return Rollout(
        request_id=event["request_id"],
        prompt_token_ids=tuple(event["prompt_token_ids"]),
        response_token_ids=tuple(event["response_token_ids"]),
        response_logprobs=tuple(float(x) for x in event["token_logprobs"]),
        model_version=event["model_version"],
        prompt=event["prompt"],
        response=event["response"],
        user_id=event["user_id"],
        adapter_version=event.get("adapter_version") or None,
        temperature=float(event.get("temperature", 1.0)),
        top_p=float(event.get("top_p", 1.0)),
        source=str(event.get("source", "live")),
    )


class TrainerService:
    def __init__(self, services: Services, trainer: LiveTrainer, config: TrainerServiceConfig) -> None:
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
        # The shared loop: rollouts and rewards are held while the buffer holds them; a step's
        # ModelPublished and generated Rollouts go out with the offsets it finished, atomically.
        self.stage = StageLoop(self.consumer, self.producer, self.dlq, self.group,
                               StageConfig("trainer", batch_timeout_ms=500, max_records=200),
                               committed=lambda tps: fetch_committed(services.kafka, self.group, tps))
        self.held: dict[str, list[tuple[TopicPartition, int]]] = {}
        self.stop = asyncio.Event()
        self.prompts_primed = asyncio.Event()
        """Set once the prompt pool holds the request stream's tail as of start-up."""
        self.steps_published = 0
        settings = services.settings
        self.pressure = ServingPressureWatcher(services, BackoffConfig(max_wait_s=settings.background_max_wait_s)) \
            if config.yield_to_serving else None

    @property
    def buffer(self) -> RolloutBuffer:
        return self.trainer.buffer

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
        await asyncio.to_thread(self.trainer.resume, path, int(latest["step"]))
        log.info("resumed from %s (step %d)", latest["version"], latest["step"])

    # ------------------------------------------------------------------ ingestion

    def _rollout(self, event: dict[str, Any]) -> Rollout | None:
        if event["model"] != self.config.model or not event["response_token_ids"] or not event["prompt_token_ids"]:
            return None
        return rollout_from_event(event)

    async def _ingest(self, batch: list[Received]) -> list[Output]:
        """The stage's handler: a rollout or reward the buffer keeps is held until the step that
        uses it is published (or the buffer drops it); the rest finish at once; a malformed
        rollout is dead-lettered."""
        now = time.monotonic()
        for item in batch:
            event = item.event
            assert event is not None  # the loop dead-letters undecodable records
            held = False
            try:
                if item.record.topic == self.s.catalog.rollouts:
                    rollout = self._rollout(event)
                    held = rollout is not None and self.buffer.add(rollout, now)
                else:
                    self.buffer.add_reward(event["request_id"], float(event["reward"]))
                    held = True
            except ValueError as exc:  # a malformed rollout (e.g. log-probs of the wrong length)
                await self.stage.dead_letter(item, exc, event)
            if held:
                self.stage.hold(item)
                self.held.setdefault(event["request_id"], []).append((item.tp, item.record.offset))
        return []

    def _release_finished(self) -> list[tuple[TopicPartition, int]]:
        """Offsets of the rollouts and rewards the buffer no longer holds (used or dropped)."""
        keep = self.buffer.held()
        finished: list[tuple[TopicPartition, int]] = []
        for rid in [rid for rid in self.held if rid not in keep]:
            finished += self.held.pop(rid)
        return finished

    # ------------------------------------------------------------------ publishing

    def _model_event(self, step: LiveStep) -> dict[str, Any]:
        return {**envelope(step.version, "system", "trainer"), "model": self.config.model,
                "version": step.version, "checkpoint_hash": step.digest, "uri": str(step.checkpoint_dir.resolve()),
                "step": step.step, "parent_version": step.parent_version,
                "metrics": {k: float(v) for k, v in step.metrics.items()}}

    def _rollout_events(self, step: LiveStep) -> list[dict[str, Any]]:
        out = []
        for g in step.generated:
            out.append({
                **envelope(g.prompt.request_id, g.prompt.tenant_id, g.prompt.user_id,
                           event_id=g.request_id),
                "request_id": g.request_id, "model": self.config.model, "model_version": g.model_version,
                "prompt": g.prompt.text, "response": g.text, "prompt_token_ids": list(g.prompt.ids),
                "response_token_ids": list(g.tokens), "token_logprobs": list(g.logprobs), "source": "trainer",
                "adapter_version": None, "temperature": 1.0, "top_p": 1.0,
            })
        return out

    async def _publish(self, step: LiveStep | None) -> None:
        """ModelPublished, the generated Rollouts (if a step ran) and the offsets it finished, atomically."""
        catalog = self.s.catalog
        outputs: list[Output] = []
        if step is not None:
            outputs.append(Output(catalog.models_topic, self._model_event(step), self.config.model))
            outputs += [Output(catalog.rollouts, e, e["request_id"]) for e in self._rollout_events(step)]
        await self.stage.commit(outputs, finished=self._release_finished())

    async def may_train(self) -> bool:
        """Whether an iteration may start now: learning yields to serving (a bounded wait)."""
        if self.pressure is not None:
            await self.pressure.wait_for_quiet()
        return True

    async def train_when_ready(self) -> None:
        self.buffer.expire(time.monotonic())
        if not self.prompts_primed.is_set():
            return  # the first iteration samples prompts from the stream's tail, not from nothing
        while self.trainer.ready(time.monotonic()) and await self.may_train():
            started = time.monotonic()
            step = await asyncio.to_thread(self.trainer.iterate, started)
            self.steps_published += 1
            TRAINER_STEPS.inc()
            TRAINER_REWARD.set(step.metrics["score_mean"])
            log.info("PPO step %d (%s) in %.1fs: %s", step.step, step.version, time.monotonic() - started,
                     {k: round(v, 4) for k, v in step.metrics.items()
                      if k in ("score_mean", "kl_mean", "policy_loss", "value_loss", "approx_kl", "generated")})
            await self._publish(step)
        await self._publish(None)

    # ------------------------------------------------------------------ prompts

    async def _follow_prompts(self) -> None:
        """Feed the prompt pool from the request stream (the tail at start, then live)."""
        catalog = self.s.catalog
        reader = EventConsumer(self.s.kafka, self.s.serde, [], group_id=None, auto_offset_reset="latest")
        await reader.start()
        try:
            while True:
                try:
                    parts = (await partitions_of(self.s.kafka, [catalog.requests]))[catalog.requests]
                    break
                except KeyError:  # no request stream yet: train without live prompts meanwhile
                    self.prompts_primed.set()
                    await asyncio.sleep(5)
            tps = [TopicPartition(catalog.requests, p) for p in parts]
            reader.raw.assign(tps)
            ends = await reader.raw.end_offsets(tps)
            starts = await reader.raw.beginning_offsets(tps)
            for tp in tps:
                reader.raw.seek(tp, max(starts[tp], ends[tp] - self.config.prompt_tail))
            async for batch in reader.batches(timeout_ms=500):
                for item in batch:
                    request = item.event
                    if request is None:
                        continue
                    self.trainer.add_prompt(request["request_id"], request["tenant_id"], request["user_id"],
                                            prompt_text(request))
                if not self.prompts_primed.is_set():
                    caught_up = [await reader.raw.position(tp) >= ends[tp] for tp in tps]
                    if all(caught_up):
                        self.prompts_primed.set()
                if self.stop.is_set():
                    return
        finally:
            await reader.stop()

    # ------------------------------------------------------------------ main loop

    async def run(self) -> None:
        if self.pressure is not None:
            run_as_background(self.s.settings.background_nice)
            await self.pressure.start()
        await self.producer.start()
        await self.plain.start()
        await self.resume()
        self.stage.subscribe(self.topics)
        await self.consumer.start()
        prompts = asyncio.create_task(self._follow_prompts(), name="prompts")
        last_tick = time.monotonic()

        async def after_batch(batch: list[Received]) -> None:
            nonlocal last_tick
            if prompts.done():
                prompts.result()  # a failed prompt reader fails the service (the supervisor restarts it)
            if batch or time.monotonic() - last_tick > self.config.tick_s:
                await self.train_when_ready()
                last_tick = time.monotonic()

        try:
            await self.stage.run(self._ingest, self.stop, after_batch)
        finally:
            prompts.cancel()
            with contextlib.suppress(BaseException):
                await prompts
            with contextlib.suppress(Exception):
                await self.consumer.stop()
            await self.producer.stop()
            await self.plain.stop()
            if self.pressure is not None:
                await self.pressure.stop()
