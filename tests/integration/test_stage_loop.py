"""The shared stage loop on the real broker (transactions): a process SIGKILLed before its commit
has its records re-delivered and their outputs appear exactly once; one killed after its commit
does not handle them again; a second consumer joining mid-stream loses and doubles nothing; a
poison record becomes a dead letter with its reason and the stream goes on. Outputs are read as
every Flywheel consumer reads them, read_committed."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import IO

import pytest
from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from infra.connect import Services, replication_factor
from streams.dlq import DeadLetters
from streams.events import inference_request
from streams.kafka import EventConsumer, EventProducer, Received, fetch_committed
from streams.replay import read_topics
from streams.schemas import load_contracts
from streams.stage_loop import Output, StageConfig, StageLoop
from streams.topics import TopicSpec, ensure_topics
from tests.conftest import flywheel_env

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class Topics:
    input: str
    output: str
    dlq: str
    group: str


@pytest.fixture
async def topics(services: Services, run_prefix: str) -> AsyncIterator[Topics]:
    """A fresh input and output topic (3 partitions each) and dead-letter topic per test."""
    name = f"{run_prefix}loop{uuid.uuid4().hex[:6]}"
    made = Topics(f"{name}.in", f"{name}.out", f"{name}.out.dlq", f"{name}-group")
    admin = AIOKafkaAdminClient(**services.kafka.client_kwargs())
    await admin.start()
    try:
        await ensure_topics(admin, [TopicSpec(made.input, "InferenceRequest", "request_id"),
                                    TopicSpec(made.output, "InferenceRequest", "request_id"),
                                    TopicSpec(made.dlq, "DeadLetter", "origin key", partitions=1)],
                            replication_factor(services.settings))
    finally:
        await admin.close()
    contracts = load_contracts()
    await services.serde.bind(made.input, contracts["InferenceRequest"])
    await services.serde.bind(made.output, contracts["InferenceRequest"])
    await services.serde.bind(made.dlq, contracts["DeadLetter"])
    yield made


async def produce(services: Services, topic: str, ids: list[str]) -> None:
    producer = EventProducer(services.kafka, services.serde, services.capabilities)
    await producer.start()
    try:
        futures = [await producer.send(topic, inference_request(user_id="u", prompt=f"prompt {i}", request_id=i),
                                       key=i) for i in ids]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def outputs(services: Services, topic: str, committed_only: bool = True) -> Counter[str]:
    counts: Counter[str] = Counter()
    for r in await read_topics(services.kafka, [topic], committed_only=committed_only):
        _, event = await services.serde.deserialize(r.value)
        counts[event["request_id"]] += 1
    return counts


@contextlib.contextmanager
def echo_stage(t: Topics, *extra: str) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen([sys.executable, "-m", "tests.integration.echo_stage", t.input, t.output, t.group, *extra],
                            env=flywheel_env(FLYWHEEL_LOG_LEVEL="WARNING"), stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)


async def read_until(stdout: IO[str], wanted: str, timeout_s: float = 90.0) -> list[str]:
    """Lines of the stage's stdout up to and including the first that starts with ``wanted``."""
    lines: list[str] = []

    def follow() -> None:
        for line in stdout:
            lines.append(line.strip())
            if line.startswith(wanted):
                return
        raise AssertionError(f"the stage exited before saying {wanted!r}: {lines}")

    await asyncio.wait_for(asyncio.to_thread(follow), timeout_s)
    return lines


async def wait_for_outputs(services: Services, topic: str, count: int, timeout_s: float = 90.0) -> Counter[str]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        found = await outputs(services, topic)
        if sum(found.values()) >= count or loop.time() > deadline:
            return found
        await asyncio.sleep(0.5)


async def test_killed_before_commit_its_records_are_redelivered_and_output_exactly_once(services, topics):
    ids = [f"pre-{n}" for n in range(30)]
    await produce(services, topics.input, ids)
    with echo_stage(topics, "--hang-before-offsets") as doomed:
        assert doomed.stdout is not None
        await read_until(doomed.stdout, "hanging")  # outputs sent and flushed, offsets not
        doomed.send_signal(signal.SIGKILL)
        doomed.wait(30)
    assert sum((await outputs(services, topics.output, committed_only=False)).values()) > 0  # in the log...
    assert sum((await outputs(services, topics.output)).values()) == 0  # ...but never committed
    with echo_stage(topics) as restarted:
        found = await wait_for_outputs(services, topics.output, len(ids))
        restarted.send_signal(signal.SIGTERM)
    assert found == Counter(ids)  # every record exactly once


async def test_killed_after_commit_its_records_are_not_handled_again(services, topics):
    first, later = [f"a-{n}" for n in range(20)], [f"b-{n}" for n in range(7)]
    await produce(services, topics.input, first)
    with echo_stage(topics) as stage:
        assert stage.stdout is not None
        await read_until(stage.stdout, f"committed {len(first)}")
        stage.send_signal(signal.SIGKILL)
        stage.wait(30)
    await produce(services, topics.input, later)
    with echo_stage(topics) as restarted:
        await wait_for_outputs(services, topics.output, len(first) + len(later))
        restarted.send_signal(signal.SIGKILL)
        stdout, _ = restarted.communicate(timeout=30)
    handled = sum(int(line.split()[1]) for line in stdout.splitlines() if line.startswith("handled"))
    assert handled == len(later)  # only the records after the commit
    assert await outputs(services, topics.output) == Counter(first + later)


def in_process_stage(services: Services, t: Topics, name: str, revoked: list[set[TopicPartition]],
                     ) -> tuple[StageLoop, EventConsumer, EventProducer, EventProducer]:
    producer = EventProducer(services.kafka, services.serde, services.capabilities,
                             transactional_id=f"{t.group}-{name}")
    plain = EventProducer(services.kafka, services.serde, services.capabilities)  # dead letters
    consumer = EventConsumer(services.kafka, services.serde, [], group_id=t.group,
                             capabilities=services.capabilities)
    stage = StageLoop(consumer, producer, DeadLetters(plain, t.dlq, "echo"), t.group,
                      StageConfig(name, max_records=10),
                      committed=lambda tps: fetch_committed(services.kafka, t.group, tps))

    async def on_revoked(tps: set[TopicPartition]) -> None:
        revoked.append(tps)

    stage.subscribe([t.input], on_revoked)
    return stage, consumer, producer, plain


async def test_a_consumer_joining_mid_batch_loses_and_doubles_nothing(services, topics):
    ids = [f"r-{n}" for n in range(600)]
    await produce(services, topics.input, ids)
    revoked_a: list[set[TopicPartition]] = []
    a, a_consumer, a_producer, _ = in_process_stage(services, topics, "a", revoked_a)
    b, b_consumer, b_producer, _ = in_process_stage(services, topics, "b", [])
    handled: dict[str, Counter[str]] = {"a": Counter(), "b": Counter()}
    b_joining = asyncio.Event()

    def slow_echo(name: str):
        async def handle(batch: list[Received]) -> list[Output]:
            # A batch is mid-way when the second consumer joins. Until the rebalance revokes its
            # partitions, the first consumer slows down so that it cannot finish the whole input
            # alone on a loaded machine (the join takes a heartbeat or more).
            slow = name == "a" and b_joining.is_set() and not any(revoked_a)
            await asyncio.sleep(0.5 if slow else 0.1)
            handled[name].update(i.event["request_id"] for i in batch if i.event)
            return [Output(topics.output, i.event, i.event["request_id"], i) for i in batch if i.event]
        return handle

    stop = asyncio.Event()
    await a_producer.start()
    await b_producer.start()
    await a_consumer.start()
    running = [asyncio.create_task(a.run(slow_echo("a"), stop))]
    try:
        await wait_for_outputs(services, topics.output, 30)
        b_joining.set()
        await b_consumer.start()
        running.append(asyncio.create_task(b.run(slow_echo("b"), stop)))
        found = await wait_for_outputs(services, topics.output, len(ids))
    finally:
        stop.set()
        await asyncio.gather(*running, return_exceptions=True)
        for producer, consumer in ((a_producer, a_consumer), (b_producer, b_consumer)):
            await consumer.stop()
            await producer.stop()
    assert any(revoked_a) and handled["b"], "the second consumer never took partitions over"
    assert found == Counter(ids)  # nothing lost, nothing doubled


async def test_a_poison_record_becomes_a_dead_letter_with_its_reason_and_the_stream_goes_on(services, topics):
    producer = EventProducer(services.kafka, services.serde, services.capabilities)
    await producer.start()
    try:
        await (await producer.send_raw(topics.input, b"\x00\x00\x0f\x42\x3fnot avro", key=b"p", partition=0))
        await (await producer.send_raw(topics.input, b"plain text", key=b"p", partition=0))
    finally:
        await producer.stop()
    await produce(services, topics.input, ["after-poison"])
    stage, consumer, out, plain = in_process_stage(services, topics, "poison", [])

    async def echo(batch: list[Received]) -> list[Output]:
        return [Output(topics.output, i.event, i.event["request_id"], i) for i in batch if i.event]

    stop = asyncio.Event()
    await out.start()
    await plain.start()
    await consumer.start()
    task = asyncio.create_task(stage.run(echo, stop))
    try:
        found = await wait_for_outputs(services, topics.output, 1)
        letters = []
        for _ in range(60):
            records = await read_topics(services.kafka, [topics.dlq])
            letters = [(await services.serde.deserialize(r.value))[1] for r in records]
            if len(letters) >= 2:
                break
            await asyncio.sleep(0.5)
    finally:
        stop.set()
        await asyncio.gather(task, return_exceptions=True)
        await consumer.stop()
        await out.stop()
        await plain.stop()
    assert found == Counter(["after-poison"])
    assert sorted(letter["origin_value"] for letter in letters) == [b"\x00\x00\x0f\x42\x3fnot avro", b"plain text"]
    reasons = " | ".join(letter["reason"] for letter in letters)
    assert "unknown schema id" in reasons and "magic byte" in reasons, reasons
    assert all(letter["origin_topic"] == topics.input and letter["stage"] == "echo" for letter in letters)
