"""``flywheel topics create|list``: the topic catalogue on the configured broker."""

from __future__ import annotations

import argparse

from aiokafka.admin import AIOKafkaAdminClient

from infra.connect import kafka_config, replication_factor, topic_catalog
from infra.runtime import run_async, setup_logging
from infra.settings import get_settings
from streams.topics import ensure_topics


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["create", "list"])


async def _run(action: str) -> int:
    settings = get_settings()
    admin = AIOKafkaAdminClient(**kafka_config(settings, "flywheel-admin").client_kwargs())
    await admin.start()
    try:
        catalog = topic_catalog(settings)
        if action == "create":
            created = await ensure_topics(admin, catalog.specs(), replication_factor(settings))
            print(f"created {len(created)} topics" + (f": {', '.join(created)}" if created else ""))
        else:
            existing = set(await admin.list_topics())
            for spec in catalog.specs():
                mark = "ok " if spec.name in existing else "-- "
                print(f"{mark}{spec.name:45s} {spec.contract:18s} key={spec.key} partitions={spec.partitions} "
                      f"cleanup={spec.cleanup_policy}")
        return 0
    finally:
        await admin.close()


def run(args: argparse.Namespace) -> int:
    setup_logging(get_settings().log_level)
    return run_async(_run(args.action))
