"""``flywheel`` command line: one console script, one subcommand per process or tool.

Subcommands are implemented in their own modules and imported only when used, so
``flywheel --help`` stays fast and a worker never imports the gateway's dependencies.
Each module defines ``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "kafka": ("flywheel.commands.kafka", "run a local Apache Kafka (KRaft) or the Tansu fallback"),
    "db": ("flywheel.commands.db", "run the embedded Postgres and apply migrations"),
    "topics": ("flywheel.commands.topics", "create the topic catalogue idempotently"),
    "record": ("flywheel.commands.record", "record topics to an Avro container file"),
    "replay": ("flywheel.commands.replay", "republish a recording in order"),
    "router": ("flywheel.commands.router", "run the Eagle router agent"),
    "personalizer": ("flywheel.commands.personalizer", "run the ASLS personalisation agent"),
    "rewarder": ("flywheel.commands.rewarder", "run the feedback-to-reward agent"),
    "worker": ("flywheel.commands.worker", "run an inference worker for one model"),
    "trainer": ("flywheel.commands.trainer", "run the RLHF trainer consumer"),
    "gateway": ("flywheel.commands.gateway", "run the OpenAI-compatible gateway and dashboard"),
    "up": ("flywheel.commands.up", "start the whole system on embedded defaults"),
    "demo": ("flywheel.commands.demo", "start the system, drive a workload, print a summary"),
    "chaos": ("flywheel.commands.chaos", "fault injection, fuzzing and soak"),
    "bench": ("flywheel.commands.bench", "run a benchmark"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flywheel", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        sp.set_defaults(_module=module)
        # Only the chosen command's module is imported to add its arguments.
        if name in _requested_command():
            importlib.import_module(module).add_arguments(sp)
    return parser


def _requested_command() -> set[str]:
    return {arg for arg in sys.argv[1:2]}


def main(argv: Sequence[str] | None = None) -> int:
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    parser = build_parser()
    args = parser.parse_args()
    module = importlib.import_module(args._module)
    result: int = module.run(args)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
