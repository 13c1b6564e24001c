"""A stage process on the shared loop for the crash tests: copies each request from one topic to
another, transactionally, and says on stdout what it handled and committed.

    python -m tests.integration.echo_stage IN OUT GROUP [--hang-before-offsets]

Dead letters (none in these tests) would go to ``OUT.dlq``.

``--hang-before-offsets``: the first transaction with outputs sends them, flushes them to the
broker and then hangs before its offsets, printing ``hanging``: the test SIGKILLs it there.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from infra.connect import connect
from infra.settings import get_settings
from streams.dlq import DeadLetters
from streams.kafka import EventConsumer, EventProducer, Received, fetch_committed
from streams.schemas import load_contracts
from streams.stage_loop import Output, StageConfig, StageLoop


class HangingProducer(EventProducer):
    async def send_offsets_to_transaction(self, offsets: dict[Any, tuple[int, str]], group_id: str) -> None:
        await self.raw.flush()
        print("hanging", flush=True)
        await asyncio.Event().wait()


async def main(args: argparse.Namespace) -> None:
    services = await connect(get_settings(), "echo-stage")
    contracts = load_contracts()
    for topic in (args.input, args.output):
        await services.serde.bind(topic, contracts["InferenceRequest"])
    await services.serde.bind(f"{args.output}.dlq", contracts["DeadLetter"])
    producer_type = HangingProducer if args.hang_before_offsets else EventProducer
    producer = producer_type(services.kafka, services.serde, services.capabilities,
                             transactional_id=f"{args.group}-0")
    consumer = EventConsumer(services.kafka, services.serde, [], group_id=args.group,
                             capabilities=services.capabilities)
    plain = EventProducer(services.kafka, services.serde, services.capabilities)  # dead letters
    stage = StageLoop(consumer, producer, DeadLetters(plain, f"{args.output}.dlq", "echo"), args.group,
                      StageConfig("echo", max_records=10),
                      committed=lambda tps: fetch_committed(services.kafka, args.group, tps))

    async def echo(batch: list[Received]) -> list[Output]:
        print(f"handled {len(batch)}", flush=True)
        return [Output(args.output, i.event, i.event["request_id"], i) for i in batch if i.event]

    async def report(_: list[Received]) -> None:
        # The positions committed by this process (a partition it has read nothing of is absent).
        positions = stage.tracker.committed
        print(f"committed {sum(p for p, _ in positions.values())}", flush=True)

    await producer.start()
    await plain.start()
    stage.subscribe([args.input])
    await consumer.start()
    try:
        await stage.run(echo, after_batch=report)
    finally:
        await consumer.stop()
        await producer.stop()
        await plain.stop()
        await services.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("input")
    parser.add_argument("output")
    parser.add_argument("group")
    parser.add_argument("--hang-before-offsets", action="store_true")
    asyncio.run(main(parser.parse_args()))
