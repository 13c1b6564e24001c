"""``flywheel worker --model NAME``: serve one model's RoutingDecisions."""

from __future__ import annotations

import argparse
import os
import socket

from core.catalog import CATALOG
from infra.settings import get_settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, choices=sorted(CATALOG))
    parser.add_argument("--worker-id", default=None, help="stable id (default: host-pid)")
    parser.add_argument("--policy", default=None, choices=["slo_goodput", "slo_odbs", "fcfs_static", "fcfs_continuous",
                                                            "sjf"], help="default: FLYWHEEL_WORKER_POLICY")
    parser.add_argument("--engine", default="auto", choices=["auto", "torch", "vllm", "echo"],
                        help="echo: answer instantly with the prompt's words (event-plane benchmarks)")
    parser.add_argument("--rollout-sample", type=float, default=None,
                        help="share of responses published as Rollouts (default: FLYWHEEL_ROLLOUT_SAMPLE)")


def run(args: argparse.Namespace) -> int:
    from workers.main import serve

    cpus = os.environ.get("FLYWHEEL_WORKER_CPUS")
    return serve(get_settings(), args.model, args.worker_id or f"{socket.gethostname()}-{os.getpid()}",
                 args.policy or get_settings().worker_policy, args.engine,
                 args.rollout_sample if args.rollout_sample is not None else get_settings().rollout_sample,
                 [int(c) for c in cpus.split(",")] if cpus else None)
