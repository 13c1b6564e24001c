"""The shared stage loop against an in-memory broker: outputs and offsets commit together, bad
records become dead letters with their reason, retries and crashes neither lose nor double an
output, out-of-order completion commits only the contiguous prefix, and a rebalance hands
uncommitted work to the next owner."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest
from aiokafka import TopicPartition

from core.errors import DeadLetterError, RetriableError, ValidationError
from streams.dlq import DeadLetters
from streams.fake_broker import FakeBroker, FakeConsumer, FakeProducer
from streams.kafka import Received
from streams.stage_loop import BatchHandler, Output, StageConfig, StageLoop, each_record

IN, OUT, DLQ = "in", "out", "dlq.test"
TP0, TP1 = TopicPartition(IN, 0), TopicPartition(IN, 1)


def request(n: int) -> dict[str, Any]:
    return {"n": n, "correlation_id": f"c{n}", "tenant_id": "t", "user_id": f"u{n}"}


async def make_stage(broker: FakeBroker, *, partitions: set[TopicPartition] = frozenset({TP0}),  # type: ignore[assignment]
                     group: str = "g", max_batch: int = 100, fail_sends: int = 0,
                     ) -> tuple[StageLoop, FakeConsumer, FakeProducer]:
    """A stage of ``group`` owning ``partitions``; returns it, its consumer and its dead-letter producer."""
    consumer, producer = broker.consumer(group, max_batch), broker.producer(fail_sends)
    dead = broker.producer(transactional=False)  # dead letters go out one by one, outside transactions

    async def committed(tps: set[TopicPartition]) -> dict[TopicPartition, tuple[int, str]]:
        return {tp: p for tp, p in broker.committed.get(group, {}).items() if tp in tps}

    stage = StageLoop(consumer, producer, DeadLetters(dead, DLQ, "test"), group,  # type: ignore[arg-type]
                      StageConfig("test", retry_backoff_s=0.0), committed=committed)
    stage.subscribe([IN])
    await consumer.assign(set(partitions))
    return stage, consumer, dead


async def drain(stage: StageLoop, handler: BatchHandler) -> None:
    """Run until a fetch comes back empty."""
    stop = asyncio.Event()

    async def after(batch: list[Received]) -> None:
        if not batch:
            stop.set()

    await stage.run(handler, stop, after)


def doubled(stage: StageLoop) -> BatchHandler:
    async def one(item: Received) -> Sequence[Output]:
        assert item.event is not None
        if item.event["n"] < 0:
            raise ValidationError(f"n={item.event['n']} must be >= 0")
        return [Output(OUT, {"n": item.event["n"] * 2}, b"k", item)]

    return each_record(one, stage)


@pytest.mark.parametrize("transactions", [True, False])
async def test_outputs_and_offsets_commit_together(transactions):
    broker = FakeBroker(transactions=transactions)
    for n in range(5):
        broker.append(IN, 0, request(n))
    stage, _, _ = await make_stage(broker, max_batch=2)
    await drain(stage, doubled(stage))
    assert broker.outputs(OUT) == [{"n": 2 * n} for n in range(5)]
    assert broker.committed["g"] == {TP0: (5, "")}


async def test_poison_records_become_dead_letters_with_their_reason_and_the_stream_goes_on():
    broker = FakeBroker()
    broker.append(IN, 0, request(1))
    broker.append(IN, 0, None, error=DeadLetterError("bad magic byte 0x07"))
    broker.append(IN, 0, request(-3))  # the handler rejects it
    broker.append(IN, 0, request(4))
    stage, _, dead = await make_stage(broker)
    await drain(stage, doubled(stage))
    assert broker.outputs(OUT) == [{"n": 2}, {"n": 8}]
    reasons = [(d["origin_offset"], d["error_type"], d["reason"]) for d in dead.dead_letters]
    assert reasons == [(1, "DeadLetterError", "bad magic byte 0x07"), (2, "ValidationError", "n=-3 must be >= 0")]
    assert dead.dead_letters[1]["user_id"] == "u-3"  # the envelope of the rejected event
    assert dead.dead_letters[0]["origin_value"] == b"undecodable"
    assert broker.committed["g"] == {TP0: (4, "")}


async def test_a_retriable_error_retries_the_batch_and_produces_each_output_once():
    broker = FakeBroker()
    for n in range(3):
        broker.append(IN, 0, request(n))
    stage, _, _ = await make_stage(broker)
    failures = iter([True, True, False])

    async def flaky(batch: list[Received]) -> list[Output]:
        if next(failures, False):
            raise RetriableError("database restarting")
        return [Output(OUT, {"n": i.event["n"]}) for i in batch if i.event]

    await drain(stage, flaky)
    assert broker.outputs(OUT) == [{"n": 0}, {"n": 1}, {"n": 2}]
    assert broker.committed["g"] == {TP0: (3, "")}


async def test_a_failed_commit_aborts_the_transaction_and_a_restart_produces_exactly_once():
    broker = FakeBroker()
    for n in range(3):
        broker.append(IN, 0, request(n))
    stage, _, _ = await make_stage(broker, fail_sends=2)  # the broker goes away mid-transaction
    with pytest.raises(RetriableError):
        await drain(stage, doubled(stage))
    assert broker.aborted == 1 and broker.outputs(OUT) == [] and "g" not in broker.committed
    restarted, _, _ = await make_stage(broker)
    await drain(restarted, doubled(restarted))
    assert broker.outputs(OUT) == [{"n": 0}, {"n": 2}, {"n": 4}]


async def test_a_crash_before_commit_redelivers_and_after_commit_does_not():
    broker = FakeBroker()
    for n in range(4):
        broker.append(IN, 0, request(n))
    stage, _, _ = await make_stage(broker, max_batch=2)
    handled: list[int] = []

    async def crashes_at_2(batch: list[Received]) -> list[Output]:
        out = []
        for item in batch:
            assert item.event is not None
            if item.event["n"] == 2 and 2 not in handled:
                handled.append(2)
                raise RuntimeError("bug: the process exits without committing")
            handled.append(item.event["n"])
            out.append(Output(OUT, {"n": item.event["n"]}))
        return out

    with pytest.raises(RuntimeError):
        await drain(stage, crashes_at_2)
    assert broker.committed["g"] == {TP0: (2, "")}  # the first batch committed, the second not
    restarted, _, _ = await make_stage(broker, max_batch=2)
    await drain(restarted, crashes_at_2)
    assert handled == [0, 1, 2, 2, 3]  # 0 and 1 (committed) are not handled again
    assert broker.outputs(OUT) == [{"n": n} for n in range(4)]  # each exactly once


async def test_out_of_order_completion_commits_the_contiguous_prefix_and_the_next_owner_skips_the_rest():
    broker = FakeBroker()
    for n in range(5):
        broker.append(IN, 0, request(n))
    stage, consumer, _ = await make_stage(broker)
    held: dict[int, Received] = {}

    async def hold_all(batch: list[Received]) -> list[Output]:
        for item in batch:
            stage.hold(item)
            held[item.record.offset] = item
        return []

    await drain(stage, hold_all)
    assert broker.committed["g"] == {TP0: (0, "")}  # nothing finished yet

    def answer(offset: int) -> list[Output]:
        return [Output(OUT, {"n": offset}, origin=held[offset])]

    await stage.commit(answer(3) + answer(2), finished=[(TP0, 3), (TP0, 2)])
    assert broker.committed["g"] == {TP0: (0, "2,3")}  # 0 still open: the position stays
    await stage.commit(answer(0), finished=[(TP0, 0)])
    assert broker.committed["g"] == {TP0: (1, "1,2")}  # 2 and 3 relative to position 1
    await consumer.revoke({TP0})  # the worker dies; 1 and 4 were never answered

    successor, _, _ = await make_stage(broker)
    again: list[int] = []

    async def answer_now(batch: list[Received]) -> list[Output]:
        again.extend(i.record.offset for i in batch)
        return [Output(OUT, {"n": i.record.offset}) for i in batch]

    await drain(successor, answer_now)
    assert again == [1, 4]  # exactly the unfinished ones
    assert sorted(o["n"] for o in broker.outputs(OUT)) == [0, 1, 2, 3, 4]  # type: ignore[index]
    assert broker.committed["g"] == {TP0: (5, "")}


async def test_a_rebalance_mid_batch_commits_the_batch_first_and_the_next_owner_starts_after_it():
    broker = FakeBroker()
    for n in range(3):
        broker.append(IN, 0, request(n))
        broker.append(IN, 1, request(10 + n))
    stage, consumer, _ = await make_stage(broker, partitions={TP0, TP1}, max_batch=4)
    aborted: list[set[TopicPartition]] = []

    async def on_revoked(tps: set[TopicPartition]) -> None:
        aborted.append(tps)

    stage.subscribe([IN], on_revoked)
    rebalance: list[asyncio.Task[None]] = []

    async def echo(batch: list[Received]) -> list[Output]:
        if not rebalance:  # a second consumer joins while the first batch is being handled
            rebalance.append(asyncio.create_task(consumer.revoke({TP1})))
            await asyncio.sleep(0.01)
            assert not aborted  # the revocation waits for this batch to commit
        return [Output(OUT, {"n": i.event["n"]}, origin=i) for i in batch if i.event]

    await drain(stage, echo)
    await rebalance[0]
    assert aborted == [{TP1}]
    # The first batch (0, 1, 2 and 10) committed with its outputs before partition 1 moved.
    assert broker.committed["g"] == {TP0: (3, ""), TP1: (1, "")}
    second, _, _ = await make_stage(broker, partitions={TP1})  # the new owner starts after it
    await drain(second, echo)
    assert sorted(o["n"] for o in broker.outputs(OUT)) == [0, 1, 2, 10, 11, 12]  # type: ignore[index]
    assert broker.committed["g"] == {TP0: (3, ""), TP1: (3, "")}


def test_config_rejects_impossible_values():
    with pytest.raises(ValueError, match="max_records=0"):
        StageConfig("s", max_records=0)
    with pytest.raises(ValueError, match="retry_backoff_s=5"):
        StageConfig("s", retry_backoff_s=5, max_retry_backoff_s=1)


def test_dead_letters_on_a_transactional_producer_are_refused():
    broker = FakeBroker()
    producer = broker.producer()
    with pytest.raises(ValueError, match="outside transactions"):
        StageLoop(broker.consumer("g"), producer, DeadLetters(producer, DLQ, "t"), "g",  # type: ignore[arg-type]
                  StageConfig("t"))
