"""``flywheel up``: run the whole system on one machine until Ctrl-C (SIGINT) or SIGTERM.

Starts the local Kafka and embedded Postgres unless external ones are configured (or already
running), applies the migrations, creates the topics, and supervises the router, personaliser,
rewarder, one worker per replica the HELR deployer places on the devices at hand, the trainer and
the gateway. On Ctrl-C it stops every process it started: the children first, then the broker and
Postgres if this command started them (ones that were already running are left running). A
signal that arrives while the services are still starting is honoured once they are up.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal

from core.errors import FatalError
from flywheel.deployment import WorkerPlan, plan_workers, read_measured_latencies
from flywheel.supervisor import ChildSpec, Supervisor
from infra.connect import connect
from infra.ports import require_free
from infra.runtime import run_async, setup_logging
from infra.services import LocalService, ensure_local_services, stop_services
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


async def prepare(settings: Settings, started: list[LocalService] | None = None) -> dict[str, float]:
    """Local services up (each one this call starts is appended to ``started``), migrations
    applied, topics created (idempotent); returns the per-token latencies earlier workers
    measured (their heartbeats), for the deployer."""
    await asyncio.to_thread(ensure_local_services, settings, started)
    services = await connect(settings, "flywheel-up", run_migrations=True, create_topics=True)
    try:
        return await read_measured_latencies(services)
    finally:
        await services.close()


async def _run(args: argparse.Namespace) -> int:
    settings = get_settings()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    started: list[LocalService] = []
    try:
        if not args.no_gateway:  # before anything starts: nothing to clean up if it is taken
            require_free(settings.gateway_port, "the gateway", "FLYWHEEL_GATEWAY_PORT")
        measured = await prepare(settings, started)
        if stop.is_set():
            log.info("stop requested while starting; stopping")
            return 0
        plans = plan_workers(per_token_ms=measured)
        for plan in plans:
            log.info("worker for %s on %s", plan.model, ", ".join(plan.devices))
        supervisor = Supervisor(children(settings, plans, not args.no_trainer, not args.no_gateway),
                                settings.home.resolve() / "logs")
        if not args.no_gateway:
            log.info("gateway: http://%s:%d/v1  dashboard: http://%s:%d/dashboard", settings.gateway_host,
                     settings.gateway_port, settings.gateway_host, settings.gateway_port)
        await supervisor.run(stop)
        log.info("all processes stopped")
        return 0
    finally:
        await asyncio.to_thread(stop_services, started)


def run(args: argparse.Namespace) -> int:
    setup_logging(get_settings().log_level)
    try:
        return run_async(_run(args))
    except FatalError as exc:  # a taken port, a missing JDK...: the message says what to do
        log.error("flywheel up: %s", exc)
        return 1
