"""``flywheel demo [--json]``: start everything, drive real prompts from simulated users, summarise."""

from __future__ import annotations

import argparse
import contextlib
import json

from infra.settings import get_settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    parser.add_argument("--duration", type=float, default=240.0, help="seconds of traffic (default 240)")
    parser.add_argument("--users", type=int, default=6)
    parser.add_argument("--keep-services", action="store_true",
                        help="leave local Kafka and Postgres running (default: stop what the demo started)")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from flywheel.demo.run import Demo, DemoConfig, summary_table
    from infra.runtime import run_async, setup_logging
    from infra.services import local_services

    settings = get_settings()
    setup_logging("WARNING")
    console = None if args.json else Console()
    demo = Demo(settings, DemoConfig(duration_s=args.duration, users=args.users))
    with contextlib.nullcontext() if args.keep_services else local_services(settings):
        result = run_async(demo.run(console))
    if args.json:
        print(json.dumps(result))
    else:
        assert console is not None
        console.print(summary_table(demo.stats.snapshot(), "Flywheel demo: summary"))
        moved = {m: round(r - result["elo_start"].get(m, 1000.0), 1) for m, r in result["elo"].items()}
        console.print(f"router ratings moved by {moved}; supervisor restarts: {result['restarts']}")
    return 0
