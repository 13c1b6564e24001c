"""``flywheel replay FILE [--prefix P] [--pace fast|recorded] [--speed X]``: republish a recording."""

from __future__ import annotations

import argparse
from pathlib import Path

from aiokafka.admin import AIOKafkaAdminClient

from infra.connect import connect
from infra.runtime import run_async, setup_logging
from infra.settings import get_settings
from streams.kafka import EventProducer, partitions_of
from streams.replay import load_recording, replay
from streams.topics import TopicSpec, ensure_topics


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", type=Path)
    parser.add_argument("--prefix", default="", help="republish into '<prefix><topic>' (created if missing)")
    parser.add_argument("--pace", choices=["fast", "recorded"], default="fast")
    parser.add_argument("--speed", type=float, default=1.0, help="with --pace recorded: time multiplier")


async def _run(args: argparse.Namespace) -> int:
    services = await connect(get_settings(), "flywheel-replay")
    recording = load_recording(args.file)
    producer = EventProducer(services.kafka, services.serde, services.capabilities)
    await producer.start()
    try:
        needed: dict[str, int] = {}
        for r in recording.records:
            target = args.prefix + r.topic
            needed[target] = max(needed.get(target, 1), r.partition + 1)
        targets = sorted(needed)
        admin = AIOKafkaAdminClient(**services.kafka.client_kwargs())
        await admin.start()
        try:  # missing targets get as many partitions as the recording used; existing ones stay
            await ensure_topics(admin, [TopicSpec(t, "", "", n) for t, n in needed.items()],
                                services.settings.replication_factor)
        finally:
            await admin.close()
        layout = await partitions_of(services.kafka, targets)
        sent = await replay(recording, producer, services.registry, args.prefix, args.pace, args.speed,
                            partitions={t: len(p) for t, p in layout.items()})
        print(f"replayed {sent} records into {', '.join(targets)}")
        return 0
    finally:
        await producer.stop()
        await services.close()


def run(args: argparse.Namespace) -> int:
    setup_logging(get_settings().log_level)
    return run_async(_run(args))
