"""The topic catalogue: every topic Flywheel reads or writes, in one place.

Keys decide ordering: requests and feedback are keyed by user, so one user's events stay in
order on one partition. Decisions go to one topic per model (the workers of a model share a
consumer group on it and scale out by partitions). Responses, chunks, rollouts and rewards are
keyed by request id. Adapters, models and heartbeats are compacted: the newest record per key
is the state.

The feedback topic has ONE partition on purpose: ELO ratings depend on the order in which
comparisons are applied, and a single partition gives every router replica (and every replay)
the same total order, so ratings are a pure function of the topic. Feedback volume is a small
fraction of request volume; one partition carries tens of thousands of events per second.

Every consuming stage has a dead-letter topic ``flywheel.dlq.<stage>``.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field, replace

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError
from aiokafka.protocol.metadata import MetadataRequest

from core.catalog import CATALOG
from core.errors import FatalError, RetriableError

log = logging.getLogger(__name__)

DAY_MS = 24 * 3600 * 1000
STAGES = ("router", "worker", "personalizer", "rewarder", "trainer", "gateway")


@dataclass(frozen=True)
class TopicSpec:
    name: str
    contract: str
    """Avro contract (type name in schemas/) of every value on this topic."""
    key: str
    """What the record key is (documentation and producer helpers)."""
    partitions: int = 3
    cleanup_policy: str = "delete"
    retention_ms: int = 7 * DAY_MS
    extra_config: dict[str, str] = field(default_factory=dict)

    def config(self) -> dict[str, str]:
        cfg = {"cleanup.policy": self.cleanup_policy, "retention.ms": str(self.retention_ms)}
        cfg.update(self.extra_config)
        return cfg


def decisions_topic(model: str, prefix: str = "") -> str:
    return f"{prefix}flywheel.decisions.{model}"


def dlq_topic(stage: str, prefix: str = "") -> str:
    return f"{prefix}flywheel.dlq.{stage}"


@dataclass(frozen=True)
class TopicCatalog:
    """Names of every topic for one deployment (``prefix`` isolates replays and tests)."""

    prefix: str = ""
    partitions: int = 3
    models: tuple[str, ...] = tuple(CATALOG)

    def _n(self, name: str) -> str:
        return f"{self.prefix}flywheel.{name}"

    @property
    def requests(self) -> str:
        return self._n("requests")

    @property
    def responses(self) -> str:
        return self._n("responses")

    @property
    def chunks(self) -> str:
        return self._n("response-chunks")

    @property
    def feedback(self) -> str:
        return self._n("feedback")

    @property
    def rollouts(self) -> str:
        return self._n("rollouts")

    @property
    def rewards(self) -> str:
        return self._n("rewards")

    @property
    def adapters(self) -> str:
        return self._n("adapters")

    @property
    def models_topic(self) -> str:
        return self._n("models")

    @property
    def heartbeats(self) -> str:
        return self._n("heartbeats")

    def decisions(self, model: str) -> str:
        return decisions_topic(model, self.prefix)

    def dlq(self, stage: str) -> str:
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; stages: {STAGES}")
        return dlq_topic(stage, self.prefix)

    def specs(self) -> list[TopicSpec]:
        p = self.partitions
        compact = {"min.cleanable.dirty.ratio": "0.1", "segment.ms": str(3600 * 1000)}
        specs = [
            TopicSpec(self.requests, "InferenceRequest", "user_id", p),
            TopicSpec(self.responses, "InferenceResponse", "request_id", p),
            TopicSpec(self.chunks, "ResponseChunk", "request_id", p, retention_ms=DAY_MS),
            TopicSpec(self.feedback, "Feedback", "user_id", 1, retention_ms=-1),
            TopicSpec(self.rollouts, "Rollout", "request_id", p),
            TopicSpec(self.rewards, "Reward", "request_id", p),
            TopicSpec(self.adapters, "AdapterPublished", "user_id", p, "compact", -1, compact),
            TopicSpec(self.models_topic, "ModelPublished", "model", 1, "compact", -1, compact),
            TopicSpec(self.heartbeats, "WorkerHeartbeat", "worker_id", 1, "compact", DAY_MS, compact),
        ]
        specs += [TopicSpec(self.decisions(m), "RoutingDecision", "request_id", p) for m in self.models]
        specs += [TopicSpec(self.dlq(s), "DeadLetter", "original key", 1, retention_ms=30 * DAY_MS)
                  for s in STAGES]
        return specs

    def spec(self, name: str) -> TopicSpec:
        for spec in self.specs():
            if spec.name == name:
                return spec
        raise KeyError(f"{name!r} is not in the topic catalogue")

    def with_prefix(self, prefix: str) -> TopicCatalog:
        return replace(self, prefix=prefix)


async def ensure_topics(admin: AIOKafkaAdminClient, specs: list[TopicSpec], replication_factor: int = 1,
                        supports_configs: bool = True) -> list[str]:
    """Create missing topics; existing ones are left alone. Returns the names created.

    With three or more replicas, every topic requires two in sync for an ``acks=all`` write
    (``min.insync.replicas=2``): an acknowledged record is on two brokers, so losing any one
    broker loses nothing acknowledged."""
    if replication_factor < 1:
        raise ValueError(f"replication_factor={replication_factor} must be >= 1")
    try:
        existing = set(await admin.list_topics())
    except Exception as exc:
        raise RetriableError(f"cannot list topics: {exc}") from exc
    missing = [s for s in specs if s.name not in existing]
    if not missing:
        await wait_for_topics(admin, [s.name for s in specs])  # another process may have just created them
        return []
    durability = {"min.insync.replicas": "2"} if replication_factor >= 3 else {}
    new = [
        NewTopic(s.name, s.partitions, replication_factor,
                 topic_configs={**s.config(), **durability} if supports_configs else {})
        for s in missing
    ]
    try:
        response = await admin.create_topics(new)
    except TopicAlreadyExistsError:
        await wait_for_topics(admin, [s.name for s in specs])
        return []
    created: list[str] = []
    for name, code, message in _topic_errors(response):
        if code == 0:
            created.append(name)
        elif code != TopicAlreadyExistsError.errno:  # a concurrent creator won the race: fine
            raise FatalError(f"cannot create topic {name}: error {code} {message}")
    if created:
        log.info("created topics: %s", ", ".join(created))
    await wait_for_topics(admin, [s.name for s in specs])
    return created


async def wait_for_topics(admin: AIOKafkaAdminClient, names: list[str], timeout_s: float = 30.0) -> None:
    """Block until EVERY broker's metadata lists every topic with a leader for each partition.

    KRaft propagates a creation to the brokers asynchronously, and a client takes its metadata from
    whichever broker it picks: on a cluster, a reader started right after creation could otherwise
    ask a broker that does not know the topic yet (aiokafka then refuses to start a group-less
    consumer with UnknownTopicOrPartitionError)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        missing = set(names) - set(await admin.list_topics())
        if not missing:
            missing = await _unseen_by_some_broker(admin, names)
        if not missing:
            return
        if loop.time() > deadline:
            raise RetriableError(f"topics not visible on every broker after {timeout_s:.0f}s: {sorted(missing)}")
        await asyncio.sleep(0.1)


async def _unseen_by_some_broker(admin: AIOKafkaAdminClient, names: list[str]) -> set[str]:
    """The topics that some broker's metadata lacks, or lists without a leader for a partition."""
    client = admin._client  # the admin's connections: aiokafka has no public per-broker metadata call
    unseen: set[str] = set()
    for broker in client.cluster.brokers():
        try:
            # Never auto-create: this only looks (a broker with auto.create.topics.enable would).
            response = await client.send(broker.nodeId, MetadataRequest(list(names), allow_auto_topic_creation=False))
        except KafkaError:
            return set(names)  # a broker that cannot answer yet has not caught up either
        for topic in response.topics:
            # (error_code, name, [is_internal,] partitions) in every version aiokafka speaks;
            # a partition is (error_code, id, leader, ...).
            error_code, name, partitions = topic[0], topic[1], topic[-1]
            if error_code != 0 or not partitions or any(p[2] < 0 for p in partitions):
                unseen.add(name)
    return unseen


def _topic_errors(response: object) -> list[tuple[str, int, str | None]]:
    out = []
    for item in getattr(response, "topic_errors", []):
        name, code = item[0], item[1]
        message = item[2] if len(item) > 2 else None
        out.append((name, code, message))
    return out
