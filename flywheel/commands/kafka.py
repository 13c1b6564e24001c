"""``flywheel kafka start|stop|status [--brokers 3]``: the local broker, or a local cluster of three."""

from __future__ import annotations

import argparse
import json

from infra.localkafka import LocalKafka
from infra.runtime import setup_logging
from infra.settings import get_settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["start", "stop", "status"])
    parser.add_argument("--broker", choices=["apache", "tansu", "auto"], default=None,
                        help="which local broker (default: FLYWHEEL_KAFKA_BROKER, auto = Apache if Java)")
    parser.add_argument("--brokers", type=int, default=None,
                        help="nodes (start: default 1; 3 = replication factor 3, min.insync.replicas 2; "
                             "stop/status: as started)")
    parser.add_argument("--json", action="store_true")


def local_kafka(brokers: int | None = None) -> LocalKafka:
    settings = get_settings()
    return LocalKafka(settings.home, settings.kafka_port, settings.kafka_controller_port, brokers=brokers)


def run(args: argparse.Namespace) -> int:
    settings = get_settings()
    setup_logging(settings.log_level)
    broker = local_kafka(args.brokers if args.action == "start" else None)
    if args.action == "start":
        state = broker.start(args.broker or settings.kafka_broker)
        nodes = f"{len(state.nodes)} brokers" if state.nodes else "broker"
        print(f"{state.kind} {nodes} {state.version} running on {state.bootstrap} (pid {state.pid})")
        return 0
    if args.action == "stop":
        stopped = broker.stop()
        print("stopped" if stopped else "not running")
        return 0
    status = broker.status()
    if args.json:
        print(json.dumps(status.as_dict()))
    elif status.running:
        print(f"running: {status.kind} broker {status.version} on {status.bootstrap} (pid {status.pid})")
    else:
        print(f"not running ({status.detail})")
    return 0 if status.running else 1
