"""Fault injection against a running Flywheel (real broker, Postgres, router, worker).

Each run drives a small workload (requests through the client, a thumbs feedback after each
answer), injects one fault in the middle of it, waits for every request to be answered, and then
checks the invariants:

* every accepted request has exactly one final response (read_committed) - ``lost``/``duplicated``;
* no acknowledged feedback is lost: it is on the feedback topic and the router has applied it;
* the router's ratings equal a replay of the feedback topic from the beginning;
* no budget is overspent: every final's cost is within its request's budget.

Faults: SIGKILL + restart of the broker, SIGKILL of a worker mid-batch, SIGKILL of the router,
restart of Postgres, SIGSTOP of the broker for 10 s, and a consumer-group rebalance from a second
worker joining. Processes killed here are restarted by the supervisor, as in ``flywheel up``.

On a local cluster (``flywheel kafka start --brokers 3``) one more: ``leader_kill`` SIGKILLs the
broker that leads the feedback partition (and, with it, its share of the requests partitions) in
the middle of the stream, times how long until a request sent right after the kill is answered
and its feedback acknowledged (``resume_s``), then restarts the broker.

The learners' faults (the trainer killed mid-iteration, the personaliser killed mid-update) need
their own processes and checks: ``flywheel.chaos.learners`` (``LEARNER_FAULTS``, re-exported here).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import signal
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from agents.router import ROUTER_CONFIG, journal_name
from agents.router_feedback import load_state, prompt_key
from core.routing.state import RouterFeedback, RouterState
from flywheel.chaos.learners import LEARNER_FAULTS, LearnerResult, run_learner_faults
from flywheel.client import FlywheelClient
from flywheel.supervisor import ChildSpec, Supervisor
from infra.connect import Services, connect
from infra.embedded_pg import EmbeddedPostgres
from infra.localkafka import LocalKafka
from infra.settings import Settings
from streams.kafka import partition_leaders
from streams.replay import read_topics

log = logging.getLogger(__name__)
MODEL = "smollm2-135m"
PROMPTS = ["What is 2+3?", "Name a fruit.", "Say hello in French.", "What color is the sky?", "Count to three.",
           "What is the capital of Italy?", "Name a planet.", "What do bees make?", "What is 10 minus 4?",
           "Give a word that rhymes with cat.", "What is ice made of?", "Name a day of the week."]


@dataclass
class RunResult:
    fault: str
    requests: int
    lost: int
    duplicated: int
    feedback_sent: int
    feedback_lost: int
    ratings_match_replay: bool
    overspent: int
    seconds: float
    notes: list[str] = field(default_factory=list)
    resume_s: float | None = None
    """leader_kill: seconds from the kill until a request sent right after it was answered."""
    feedback_resume_s: float | None = None
    """leader_kill: seconds from the kill until that request's feedback was acknowledged."""

    @property
    def ok(self) -> bool:
        return not (self.lost or self.duplicated or self.feedback_lost or self.overspent) and self.ratings_match_replay


class ChaosSystem:
    """A router and a worker under supervision, on the given (test or local) services."""

    def __init__(self, settings: Settings, engine: str = "auto") -> None:
        self.settings = settings
        self.kafka = LocalKafka(settings.home, settings.kafka_port, settings.kafka_controller_port)
        self.engine = engine
        self.fault_notes: list[str] = []
        self.resume: tuple[float | None, float | None] = (None, None)
        self.postgres = EmbeddedPostgres(settings.home, settings.postgres_port)
        env = {"FLYWHEEL_TOPIC_PREFIX": settings.topic_prefix, "FLYWHEEL_HOME": str(settings.home.resolve()),
               "FLYWHEEL_KAFKA_PORT": str(settings.kafka_port),
               "FLYWHEEL_KAFKA_CONTROLLER_PORT": str(settings.kafka_controller_port),
               "FLYWHEEL_POSTGRES_PORT": str(settings.postgres_port), "FLYWHEEL_LOG_LEVEL": "WARNING"}
        self.supervisor = Supervisor([ChildSpec("router", ("router",), env),
                                      ChildSpec("worker-1", self._worker_args("chaos-1"), env)],
                                     settings.home.resolve() / "logs" / "chaos")
        self.env = env
        self.services: Services | None = None
        self.client: FlywheelClient | None = None
        self._watch: asyncio.Task[None] | None = None

    def _worker_args(self, worker_id: str) -> tuple[str, ...]:
        return ("worker", "--model", MODEL, "--worker-id", worker_id, "--engine", self.engine)

    async def start(self) -> None:
        self.services = await connect(self.settings, "chaos", run_migrations=True, create_topics=True)
        self.client = FlywheelClient(self.services)
        await self.client.start()
        self.supervisor.start_all()
        self._watch = asyncio.create_task(self._supervise())
        await self.run_workload("warm-up", count=2)  # models loaded, groups joined

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
        if self.client is not None:
            await self.client.close()
        if self.services is not None:
            await self.services.close()

    # -- workload ------------------------------------------------------------------------------
    async def run_workload(self, tag: str, count: int = 8, fault: Callable[[], Awaitable[None]] | None = None,
                           timeout_s: float = 420.0) -> tuple[list[dict[str, Any]], list[str], list[dict[str, Any]]]:
        """Submit ``count`` requests concurrently (budgets included), inject ``fault`` once the
        first answer is back, send a thumbs feedback per answer. Returns (requests, feedback ids,
        answers)."""
        assert self.client is not None
        client = self.client
        rng = random.Random(tag)
        requests = [dict(user_id=f"{tag}-user-{i % 3}", prompt=PROMPTS[i % len(PROMPTS)], max_tokens=24,
                         budget_usd=0.001, model_hints=[MODEL]) for i in range(count)]
        feedback_ids: list[str] = []
        answers: list[dict[str, Any]] = []
        first_answer = asyncio.Event()

        async def one(fields: dict[str, Any]) -> None:
            answer = await client.submit(timeout_s=timeout_s, **fields)
            answers.append(answer)
            first_answer.set()
            record = await client.feedback(user_id=fields["user_id"], request_id=answer["request_id"],
                                           kind="thumbs", model=answer["model"], thumbs_up=rng.random() < 0.7)
            feedback_ids.append(record["event_id"])

        tasks = [asyncio.create_task(one(f)) for f in requests]
        if fault is not None:
            await asyncio.wait_for(first_answer.wait(), timeout_s)
            await fault()
        await asyncio.gather(*tasks)
        return requests, feedback_ids, answers

    # -- faults ----------------------------------------------------------------------------------
    def _kill_child(self, name: str) -> None:
        pid = self.supervisor.pid_of(name)
        if pid is not None:
            os.killpg(pid, signal.SIGKILL)

    async def fault(self, name: str) -> None:
        if name == "broker_kill":
            await asyncio.to_thread(self.kafka.kill)
            await asyncio.sleep(2)
            await asyncio.to_thread(self.kafka.start, "apache")
        elif name == "worker_kill":
            self._kill_child("worker-1")
        elif name == "router_kill":
            self._kill_child("router")
        elif name == "postgres_restart":
            await asyncio.to_thread(self.postgres.kill)
            await asyncio.sleep(2)
            await asyncio.to_thread(self.postgres.start)
        elif name == "broker_pause":
            self.kafka.pause()
            await asyncio.sleep(10)
            self.kafka.resume()
        elif name == "rebalance":
            second = f"worker-{len(self.supervisor.children) + 1}"
            spec = ChildSpec(second, self._worker_args(f"chaos-{second}"), self.env)
            self.supervisor.add(spec)
        elif name == "leader_kill":
            await self._leader_kill()
        else:
            raise ValueError(f"unknown fault {name!r}")

    async def _leader_kill(self) -> None:
        """Kill the leader of the feedback partition (and its requests partitions) mid-stream."""
        assert self.services is not None and self.client is not None
        if self.kafka.brokers < 3:
            raise ValueError("leader_kill needs a local cluster: flywheel kafka start --brokers 3")
        catalog = self.services.catalog
        leaders = await partition_leaders(self.services.kafka, [catalog.feedback, catalog.requests])
        victim = next(node for tp, node in leaders.items() if tp.topic == catalog.feedback)
        led = sorted(tp.partition for tp, node in leaders.items() if tp.topic == catalog.requests and node == victim)
        killed_at = time.monotonic()
        await asyncio.to_thread(self.kafka.kill_node, victim)
        # Serving resumes when a request sent after the kill is answered and its feedback acked.
        answer = await self.client.submit(user_id="leader-kill-probe", prompt=PROMPTS[0], max_tokens=8,
                                          budget_usd=0.001, model_hints=[MODEL], timeout_s=300)
        answered_at = time.monotonic()
        await self.client.feedback(user_id="leader-kill-probe", request_id=answer["request_id"], kind="thumbs",
                                   model=answer["model"], thumbs_up=True)
        acked_at = time.monotonic()
        self.resume = (answered_at - killed_at, acked_at - killed_at)
        self.fault_notes.append(f"killed broker {victim}: leader of {catalog.feedback}[0] and of "
                                f"{catalog.requests} partitions {led}; answered after {answered_at - killed_at:.1f}s, "
                                f"feedback acknowledged after {acked_at - killed_at:.1f}s")
        await asyncio.to_thread(self.kafka.start_node, victim)

    # -- checks ----------------------------------------------------------------------------------
    async def finals(self) -> Counter[str]:
        assert self.services is not None
        counts: Counter[str] = Counter()
        for r in await read_topics(self.services.kafka, [self.services.catalog.responses]):
            _, event = await self.services.serde.deserialize(r.value)
            counts[event["request_id"]] += 1
        return counts

    async def describe(self, request_ids: list[str]) -> list[dict[str, Any]]:
        """Where each final of these requests came from (for the report)."""
        assert self.services is not None
        out = []
        for r in await read_topics(self.services.kafka, [self.services.catalog.responses]):
            _, event = await self.services.serde.deserialize(r.value)
            if event["request_id"] in request_ids:
                out.append({"request_id": event["request_id"][:8], "worker": event["worker_id"],
                            "partition": r.partition, "offset": r.offset, "time": r.timestamp})
        return out

    async def replayed_state(self) -> tuple[RouterState, int]:
        """The router state rebuilt from the feedback topic alone (plus the prompt embeddings)."""
        assert self.services is not None
        svc = self.services
        records = await read_topics(svc.kafka, [svc.catalog.feedback])
        state = RouterState(ROUTER_CONFIG, tuple(svc.catalog.models))
        rows = await svc.pool.fetch("SELECT request_id, prompt_key, embedding FROM request_embeddings")
        from agents.router_feedback import as_vector

        placed = {r["request_id"]: (r["prompt_key"], as_vector(r["embedding"])) for r in rows}
        last = -1
        for r in records:
            last = r.offset
            try:
                _, event = await svc.serde.deserialize(r.value)
                anchor = (event.get("pairwise") or {}).get("request_id_a") or event["request_id"]
                key, vector = placed.get(anchor) or (prompt_key(event.get("prompt") or ""), None)
                if vector is None:
                    continue  # the router dead-letters feedback it cannot place
                fb = RouterFeedback.from_event(event, key)
                state.comparisons(fb)
                state.apply(fb, vector if key not in state.ranker.index else None)
            except Exception:
                continue
        return state, last

    async def check(self, fault: str, requests: list[dict[str, Any]], feedback_ids: list[str],
                    answers: list[dict[str, Any]], started: float) -> RunResult:
        assert self.services is not None
        svc = self.services
        by_id = {a["request_id"]: a for a in answers}
        asked = set(by_id) | {a["request_id"] for a in answers}
        # One read, no re-reads: the client reads read_committed (as every EventConsumer does), so
        # every answer it handed out is a committed final, and a read_committed reader started after
        # it can only see more. (The re-read this replaced papered over a client that read
        # uncommitted finals of transactions that later aborted: docs/RELIABILITY.md.)
        counts = await self.finals()
        lost = sum(1 for rid in asked if counts[rid] == 0) + (len(requests) - len(answers))
        duplicated = sum(counts[rid] - 1 for rid in asked if counts[rid] > 1)
        dupes = [rid for rid in asked if counts[rid] > 1]
        overspent = sum(1 for a in answers if a["cost_usd"] > 0.001 + 1e-12)
        # feedback: on the topic, and applied by the router (wait for it to catch up)
        on_topic = set()
        for r in await read_topics(svc.kafka, [svc.catalog.feedback]):
            _, event = await svc.serde.deserialize(r.value)
            on_topic.add(event["event_id"])
        feedback_lost = sum(1 for f in feedback_ids if f not in on_topic)
        replay, last_offset = await self.replayed_state()
        deadline = time.monotonic() + 120
        live, offset = await load_state(svc.pool, journal_name(svc), ROUTER_CONFIG, tuple(svc.catalog.models))
        while offset < last_offset and time.monotonic() < deadline:
            await asyncio.sleep(1)
            live, offset = await load_state(svc.pool, journal_name(svc), ROUTER_CONFIG, tuple(svc.catalog.models))
        match = (offset >= last_offset and live.ranker.global_ratings() == replay.ranker.global_ratings()
                 and live.ranker.applied == replay.ranker.applied)
        notes = [] if match else [f"live offset {offset} vs topic {last_offset}; live {live.ranker.global_ratings()} "
                                  f"replay {replay.ranker.global_ratings()}"]
        if dupes:
            notes.append(f"duplicated finals: {await self.describe(dupes)}")
        notes += self.fault_notes
        return RunResult(fault, len(requests), lost, duplicated, len(feedback_ids), feedback_lost, match, overspent,
                         time.monotonic() - started, notes, *self.resume)

    async def run_fault(self, fault: str) -> RunResult:
        started = time.monotonic()
        self.fault_notes, self.resume = [], (None, None)
        requests, feedback_ids, answers = await self.run_workload(f"{fault}-{started:.0f}",
                                                                  fault=lambda: self.fault(fault))
        return await self.check(fault, requests, feedback_ids, answers, started)


FAULTS = ("broker_kill", "worker_kill", "router_kill", "postgres_restart", "broker_pause", "rebalance")
CLUSTER_FAULTS = ("leader_kill",)


def available_faults(settings: Settings) -> tuple[str, ...]:
    """Every fault this broker can take: the cluster faults only on a local cluster of three."""
    brokers = LocalKafka(settings.home, settings.kafka_port, settings.kafka_controller_port).brokers
    return FAULTS + (CLUSTER_FAULTS if brokers >= 3 else ())


async def run_faults(settings: Settings, faults: tuple[str, ...] = FAULTS, runs: int = 1,
                     engine: str = "auto") -> list[RunResult]:
    system = ChaosSystem(settings, engine)
    await system.start()
    results = []
    try:
        for _ in range(runs):
            for fault in faults:
                log.info("fault %s", fault)
                results.append(await system.run_fault(fault))
                log.info("%s", results[-1])
    finally:
        await system.stop()
    return results


__all__ = ["FAULTS", "LEARNER_FAULTS", "LearnerResult", "RunResult", "run_faults", "run_learner_faults"]
