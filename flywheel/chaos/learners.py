"""Faults of the learners: the trainer killed mid-iteration, the personaliser killed mid-update.

A worker (every response also a Rollout), the trainer (2 gloo ranks) and the personaliser run
under supervision on the real broker and Postgres. Each fault first measures one undisturbed
round of its learner's work (rollouts rewarded -> ModelPublished; feedback -> AdapterPublished),
then starts the same work again and SIGKILLs the learner's whole process group half that time
later, i.e. in the middle of the PPO iteration or of the adapter update; the supervisor restarts
it. Then it checks, from the topics, the registry and the files:

- **lost**: work whose result was never published (a rewarded batch with no step; feedback
  whose update never produced an adapter version);
- **duplicated** (applied twice): two steps with the same number or version, a batch trained
  twice, two different adapters under one user version, or one feedback event applied twice;
- **half_written**: a published checkpoint or adapter whose directory is missing or whose bytes
  do not hash to the announced hash.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.artifacts import hash_directory
from flywheel.supervisor import ChildSpec, Supervisor
from infra.connect import Services, connect
from infra.settings import Settings
from streams import events
from streams.events import envelope, inference_request
from streams.kafka import EventProducer
from streams.replay import read_topics

log = logging.getLogger(__name__)
MODEL = "smollm2-135m"
LEARNER_FAULTS = ("trainer_kill", "personalizer_kill")
PERSONALIZER_ENV = {"FLYWHEEL_PERSONALIZER_MIN_EVENTS": "2", "FLYWHEEL_PERSONALIZER_BASE_BATCH": "1.0",
                    "FLYWHEEL_PERSONALIZER_MIN_BATCH": "0.5", "FLYWHEEL_PERSONALIZER_AGREE_OCTAVES": "0",
                    "FLYWHEEL_PERSONALIZER_MAX_UPDATES_PER_HOUR": "3600",
                    "FLYWHEEL_PERSONALIZER_UPDATE_BUDGET_S": "20"}
TRAINER_ENV = {"FLYWHEEL_TRAINER_BATCH_SIZE": "2", "FLYWHEEL_TRAINER_GENERATE": "1",
               "FLYWHEEL_TRAINER_MAX_NEW_TOKENS": "8", "FLYWHEEL_TRAINER_REWARD_TIMEOUT_S": "3600"}


@dataclass
class LearnerResult:
    fault: str
    work: int
    """Units of work expected to be published (PPO steps, or adapter versions)."""
    published: int
    lost: int
    duplicated: int
    half_written: int
    killed_mid_work: bool
    """The learner died before publishing the work in flight (what the fault means to test)."""
    seconds: float
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.lost or self.duplicated or self.half_written)


def _decision(request: dict[str, Any]) -> dict[str, Any]:
    return {**envelope(request["request_id"], request["tenant_id"], request["user_id"]), "request": request,
            "model": MODEL, "candidates": [], "fallbacks": [], "router_name": "chaos", "router_version": "0",
            "reason": "chaos", "feedback_offset": -1}


def _intact(uri: str, announced_hash: str) -> bool:
    path = Path(uri)
    return path.is_dir() and hash_directory(path) == announced_hash


class LearnerChaos:
    """A worker, the trainer and the personaliser under supervision (their own topic prefix)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        env = {"FLYWHEEL_TOPIC_PREFIX": settings.topic_prefix, "FLYWHEEL_HOME": str(settings.home.resolve()),
               "FLYWHEEL_KAFKA_PORT": str(settings.kafka_port),
               "FLYWHEEL_KAFKA_CONTROLLER_PORT": str(settings.kafka_controller_port),
               "FLYWHEEL_POSTGRES_PORT": str(settings.postgres_port), "FLYWHEEL_LOG_LEVEL": "WARNING"}
        self.supervisor = Supervisor([
            ChildSpec("worker", ("worker", "--model", MODEL, "--worker-id", "learner-chaos", "--rollout-sample", "1"),
                      env),
            ChildSpec("trainer", ("trainer",), {**env, **TRAINER_ENV}),
            ChildSpec("personalizer", ("personalizer",), {**env, **PERSONALIZER_ENV}),
        ], settings.home.resolve() / "logs" / "learner-chaos")
        self.services: Services | None = None
        self.producer: EventProducer | None = None
        self._watch: asyncio.Task[None] | None = None

    @property
    def svc(self) -> Services:
        assert self.services is not None
        return self.services

    async def start(self) -> None:
        self.services = await connect(self.settings, "learner-chaos", run_migrations=True, create_topics=True)
        self.producer = EventProducer(self.svc.kafka, self.svc.serde, self.svc.capabilities)
        await self.producer.start()
        self.supervisor.start_all()
        self._watch = asyncio.create_task(self._supervise())

    async def _supervise(self) -> None:
        while True:
            await asyncio.to_thread(self.supervisor.check)
            await asyncio.sleep(0.5)

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        await asyncio.to_thread(self.supervisor.stop_all)
        if self.producer is not None:
            await self.producer.stop()
        if self.services is not None:
            await self.services.close()

    def _kill(self, name: str) -> None:
        pid = self.supervisor.pid_of(name)
        if pid is not None:
            os.killpg(pid, signal.SIGKILL)  # the trainer's gloo ranks share its process group

    # -- helpers -----------------------------------------------------------------------------------
    async def _events(self, topic: str) -> list[dict[str, Any]]:
        return [(await self.svc.serde.deserialize(r.value))[1] for r in await read_topics(self.svc.kafka, [topic])]

    async def _wait(self, check: Any, timeout_s: float, what: str) -> Any:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = await check()
            if found:
                return found
            await asyncio.sleep(1.0)
        raise TimeoutError(f"timed out waiting for {what}")

    async def _ask(self, user: str, prompt: str, seed: int | None = None) -> dict[str, Any]:
        """Serve one request (request stream + decision) and return its response."""
        assert self.producer is not None
        catalog = self.svc.catalog
        req = inference_request(user_id=user, prompt=prompt, max_tokens=12, seed=seed,
                                temperature=0.0 if seed is None else 1.0)
        await self.producer.send_and_wait(catalog.requests, req, key=user)
        await self.producer.send_and_wait(catalog.decisions(MODEL), _decision(req), key=req["request_id"])

        async def answered() -> dict[str, Any] | None:
            found = [e for e in await self._events(catalog.responses) if e["request_id"] == req["request_id"]]
            return found[0] if found else None

        response: dict[str, Any] = await self._wait(answered, 600, f"a response to {prompt!r}")
        return response

    # -- the trainer -------------------------------------------------------------------------------
    async def _reward_batch(self, tag: str) -> float:
        """Two served, rewarded rollouts: one PPO step's worth of work (batch size 2); returns
        the moment (monotonic) the last reward went out, when the iteration can start."""
        assert self.producer is not None
        catalog = self.svc.catalog
        answers = [await self._ask(f"{tag}-user", p) for p in (f"{tag}: what is 2+3?", f"{tag}: name a fruit.")]
        ids = {a["request_id"] for a in answers}

        async def rollouts() -> list[dict[str, Any]] | None:
            found = [e for e in await self._events(catalog.rollouts) if e["request_id"] in ids]
            return found if len(found) == len(ids) else None

        for i, r in enumerate(await self._wait(rollouts, 300, "the rollouts")):
            reward = {**envelope(r["request_id"], "chaos", r["user_id"]), "request_id": r["request_id"],
                      "reward": 1.0 if i == 0 else -1.0, "source": "feedback", "feedback_id": None}
            await self.producer.send_and_wait(catalog.rewards, reward, key=r["request_id"])
        return time.monotonic()

    async def _steps(self) -> list[dict[str, Any]]:
        return [e for e in await self._events(self.svc.catalog.models_topic) if e["model"] == MODEL]

    async def trainer_kill(self) -> LearnerResult:
        started = time.monotonic()
        before = len(await self._steps())
        t0 = await self._reward_batch("warm")
        await self._wait(lambda: self._at_least(before + 1), 900, "the undisturbed PPO step")
        iteration_s = time.monotonic() - t0
        await self._reward_batch("fault")
        await asyncio.sleep(max(1.0, iteration_s / 2))
        killed_before = len(await self._steps())
        self._kill("trainer")
        await self._wait(lambda: self._at_least(before + 2), 900, "the step of the killed iteration")
        await asyncio.sleep(10)  # a duplicate, if any, would show up now
        steps = await self._steps()
        numbers = Counter(int(s["step"]) for s in steps)
        versions = Counter(str(s["version"]) for s in steps)
        duplicated = sum(n - 1 for n in numbers.values() if n > 1) + sum(n - 1 for n in versions.values() if n > 1)
        gaps = sorted(set(range(1, max(numbers) + 1)) - set(numbers)) if numbers else []
        half = sum(1 for s in steps if not _intact(s["uri"], s["checkpoint_hash"]))
        generated = Counter(e["request_id"] for e in await self._events(self.svc.catalog.rollouts)
                            if e.get("source") == "trainer")
        duplicated += sum(n - 1 for n in generated.values() if n > 1)
        notes = [f"iteration took {iteration_s:.0f}s undisturbed; killed {max(1.0, iteration_s / 2):.0f}s "
                 "into the next",
                 f"steps {sorted(numbers)}; trainer restarts {self.supervisor.status()['trainer']['restarts']}"]
        if gaps:
            notes.append(f"missing step numbers {gaps}")
        return LearnerResult("trainer_kill", work=before + 2, published=len(steps),
                             lost=max(0, before + 2 - len(numbers)) + len(gaps), duplicated=duplicated,
                             half_written=half, killed_mid_work=killed_before == before + 1,
                             seconds=time.monotonic() - started, notes=notes)

    async def _at_least(self, n: int) -> bool:
        return len(await self._steps()) >= n

    # -- the personaliser ----------------------------------------------------------------------------
    async def _feedback_round(self, user: str, topic: str) -> tuple[list[str], float]:
        """Two sampled answers and the feedback that makes the personaliser update ``user``;
        returns the feedback ids and the moment the last one went out."""
        assert self.producer is not None
        prompt = f"Describe {topic} in one sentence."
        first = await self._ask(user, prompt, seed=1)
        second = await self._ask(user, prompt, seed=2)
        sent = [
            events.feedback(user_id=user, request_id=first["request_id"], kind="implicit", model=MODEL,
                            implicit={"signal": "regenerate", "edited_text": None, "dwell_ms": None}),
            events.feedback(user_id=user, request_id=second["request_id"], kind="pairwise", model=MODEL,
                            pairwise={"request_id_a": first["request_id"], "model_a": MODEL,
                                      "request_id_b": second["request_id"], "model_b": MODEL, "winner": "b"}),
        ]
        for event in sent:
            await self.producer.send_and_wait(self.svc.catalog.feedback, event, key=user)
        return [e["event_id"] for e in sent], time.monotonic()

    async def _versions(self, user: str) -> list[dict[str, Any]]:
        return [e for e in await self._events(self.svc.catalog.adapters) if e["user_id"] == user]

    async def personalizer_kill(self) -> LearnerResult:
        started = time.monotonic()
        user = f"chaos-{int(started)}"
        sent, t0 = await self._feedback_round(user, "the sea")
        await self._wait(lambda: self._versions_at_least(user, 1), 900, "the undisturbed adapter update")
        update_s = time.monotonic() - t0
        more, _ = await self._feedback_round(user, "a forest")
        sent += more
        await asyncio.sleep(max(1.0, update_s / 2))
        killed_before = len({e["version"] for e in await self._versions(user)})
        self._kill("personalizer")
        await self._wait(lambda: self._versions_at_least(user, 2), 900, "the update of the killed personaliser")
        await asyncio.sleep(10)
        announced = await self._versions(user)
        hashes: dict[int, set[str]] = {}
        for e in announced:
            hashes.setdefault(int(e["version"]), set()).add(e["adapter_hash"])
        duplicated = sum(len(h) - 1 for h in hashes.values())
        rows = await self.svc.pool.fetch("SELECT version, adapter_hash, uri FROM adapters WHERE user_id = $1", user)
        applied = await self.svc.pool.fetch("SELECT feedback_id FROM personalizer_applied WHERE user_id = $1", user)
        applied_ids = Counter(r["feedback_id"] for r in applied)
        duplicated += sum(n - 1 for n in applied_ids.values() if n > 1)
        versions = sorted(r["version"] for r in rows)
        gaps = sorted(set(range(1, max(versions) + 1)) - set(versions)) if versions else []
        lost = sum(1 for f in sent if f not in applied_ids) + len(gaps)
        half = sum(1 for r in rows if not _intact(r["uri"], r["adapter_hash"]))
        notes = [f"update took {update_s:.0f}s undisturbed; killed {max(1.0, update_s / 2):.0f}s into the next",
                 f"versions {versions}; {len(applied_ids)}/{len(sent)} feedback applied; "
                 f"personaliser restarts {self.supervisor.status()['personalizer']['restarts']}"]
        return LearnerResult("personalizer_kill", work=2, published=len(hashes), lost=lost, duplicated=duplicated,
                             half_written=half, killed_mid_work=killed_before == 1,
                             seconds=time.monotonic() - started, notes=notes)

    async def _versions_at_least(self, user: str, n: int) -> bool:
        return len({e["version"] for e in await self._versions(user)}) >= n


async def run_learner_faults(settings: Settings, faults: tuple[str, ...] = LEARNER_FAULTS,
                             runs: int = 1) -> list[LearnerResult]:
    system = LearnerChaos(settings)
    await system.start()
    results = []
    try:
        for _ in range(runs):
            for fault in faults:
                log.info("learner fault %s", fault)
                results.append(await (system.trainer_kill() if fault == "trainer_kill" else system.personalizer_kill()))
                log.info("%s", results[-1])
    finally:
        await system.stop()
    return results
