"""``flywheel record TOPIC... -o FILE``: write topics (up to now) to an Avro container file."""

from __future__ import annotations

import argparse
from pathlib import Path

from infra.connect import connect
from infra.runtime import run_async, setup_logging
from infra.settings import get_settings
from streams.replay import record


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("topics", nargs="+", help="topic names (or catalogue names like 'feedback')")
    parser.add_argument("-o", "--output", type=Path, required=True)


async def _run(args: argparse.Namespace) -> int:
    services = await connect(get_settings(), "flywheel-record")
    try:
        names = [_resolve(services.catalog, t) for t in args.topics]
        count = await record(services.kafka, services.registry, names, args.output)
        print(f"recorded {count} records from {', '.join(names)} to {args.output}")
        return 0
    finally:
        await services.close()


def _resolve(catalog: object, name: str) -> str:
    """Accept full topic names and short catalogue names (``feedback`` -> ``<prefix>flywheel.feedback``)."""
    short = {"response-chunks": "chunks", "models": "models_topic"}.get(name, name.replace("-", "_"))
    value = getattr(catalog, short, None)
    return value if isinstance(value, str) else name


def run(args: argparse.Namespace) -> int:
    setup_logging(get_settings().log_level)
    return run_async(_run(args))
