"""``flywheel up``: run the whole system on one machine until Ctrl-C.

Starts the local Kafka and embedded Postgres unless external ones are configured, applies the
migrations, creates the topics, and supervises the router, personaliser, rewarder, one worker per
replica the HELR deployer places on the devices at hand, the trainer and the gateway.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal

from flywheel.deployment import WorkerPlan, plan_workers, read_measured_latencies
from flywheel.supervisor import ChildSpec, Supervisor
from infra.connect import connect
from infra.runtime import run_async, setup_logging
from infra.services import ensure_local_services
from infra.settings import Settings, get_settings

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-trainer", action="store_true", help="do not run the RLHF trainer")
    parser.add_argument("--no-gateway", action="store_true")


def children(settings: Settings, plans: list[WorkerPlan], trainer: bool = True, gateway: bool = True
             ) -> list[ChildSpec]:
    specs = [ChildSpec("router", ("router",)), ChildSpec("personalizer", ("personalizer",)),
             ChildSpec("rewarder", ("rewarder",))]
    for i, plan in enumerate(plans):
        specs.append(ChildSpec(f"worker-{plan.model}-{i}", ("worker", "--model", plan.model,
                                                             "--worker-id", f"{plan.model}-{i}"), plan.env()))
    if trainer:
        specs.append(ChildSpec("trainer", ("trainer",)))
    if gateway:
        specs.append(ChildSpec("gateway", ("gateway",)))
    return specs


async def prepare(settings: Settings) -> dict[str, float]:
    """Local services up, migrations applied, topics created (idempotent); returns the per-token
    latencies earlier workers measured (their heartbeats), for the deployer."""
    await asyncio.to_thread(ensure_local_services, settings)
    services = await connect(settings, "flywheel-up", run_migrations=True, create_topics=True)
    try:
        return await read_measured_latencies(services)
    finally:
        await services.close()


async def _run(args: argparse.Namespace) -> int:
    settings = get_settings()
    measured = await prepare(settings)
    plans = plan_workers(per_token_ms=measured)
    for plan in plans:
        log.info("worker for %s on %s", plan.model, ", ".join(plan.devices))
    supervisor = Supervisor(children(settings, plans, not args.no_trainer, not args.no_gateway),
                            settings.home.resolve() / "logs")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if not args.no_gateway:
        log.info("gateway: http://%s:%d/v1  dashboard: http://%s:%d/dashboard", settings.gateway_host,
                 settings.gateway_port, settings.gateway_host, settings.gateway_port)
    await supervisor.run(stop)
    log.info("all processes stopped")
    return 0


def run(args: argparse.Namespace) -> int:
    setup_logging(get_settings().log_level)
    return run_async(_run(args))
