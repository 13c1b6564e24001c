"""``flywheel bench NAME [--json]``: run one benchmark and print its result."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import Any

BENCHMARKS: dict[str, str] = {
    "pipeline": "bench.pipeline",
    "request-plane": "bench.request_plane",
    "routing": "bench.routing",
    "routing-data": "bench.routing_generator",
    "scheduling": "bench.scheduling",
    "engine": "bench.engine",
    "personalization": "bench.personalization",
    "personalization-live": "bench.personalization_live",
    "rlhf": "bench.rlhf",
    "comigs": "bench.comigs",
    "reward-model": "bench.reward_model",
    "tasks": "bench.task_accuracy",
    "loop": "bench.loop",
}
"""Benchmark name -> module (``add_arguments(parser)``, ``run(args) -> dict``). Modules are
imported by name only when chosen: ``bench`` sits above the edge in the layer contract."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    wanted = sys.argv[2] if len(sys.argv) > 2 else None
    for name, module in BENCHMARKS.items():
        sp = sub.add_parser(name)
        sp.add_argument("--json", action="store_true", help="print one JSON object")
        sp.set_defaults(_bench_module=module)
        if name == wanted:
            importlib.import_module(module).add_arguments(sp)


def _print_table(result: dict[str, Any], indent: int = 0) -> None:
    for key, value in result.items():
        if isinstance(value, dict):
            print(" " * indent + f"{key}:")
            _print_table(value, indent + 2)
        else:
            shown = f"{value:.4g}" if isinstance(value, float) else value
            print(" " * indent + f"{key}: {shown}")


def run(args: argparse.Namespace) -> int:
    module = importlib.import_module(args._bench_module)
    result: dict[str, Any] = module.run(args)
    if args.json:
        print(json.dumps(result))
    else:
        _print_table(result)
    return 0
