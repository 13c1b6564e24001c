"""Bounded loopback load through the gateway: a rate ramp and a memory soak.

The ramp sends a fixed number of chat completions at each rate (open loop: arrivals do not wait
for answers) and reports, per rate, how many were answered, how many the gateway turned away
with 429, and the latency percentiles. ``max_rate_within_slo`` is the highest rate whose p99 stays
within the interactive SLO with every request answered. Beyond it the gateway pushes back with
429 (its in-flight limit, or the router's and workers' consumer lag), and what it accepted waits
in Kafka rather than in memory.

The soak holds a sustainable rate for N minutes and compares the resident memory of every
Flywheel process at the start (after a warm-up) and the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from flywheel.chaos.faults import MODEL, PROMPTS
from flywheel.gateway.stats import percentile
from flywheel.supervisor import ChildSpec, Supervisor
from infra.connect import connect
from infra.settings import Settings

log = logging.getLogger(__name__)
SLO_S = 20.0


@dataclass
class RateResult:
    rate: float
    sent: int
    answered: int
    rejected_429: int
    errors: int
    p50_s: float
    p99_s: float

    @property
    def within_slo(self) -> bool:
        return self.errors == 0 and self.rejected_429 == 0 and self.answered == self.sent and self.p99_s <= SLO_S


def _rss_mb(pid: int) -> float:
    """Resident memory of a process and its children (Linux /proc), in MiB."""
    total = 0
    for candidate in [pid, *_descendants(pid)]:
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += int(Path(f"/proc/{candidate}/statm").read_text().split()[1])
    import os

    return total * os.sysconf("SC_PAGE_SIZE") / 2**20


def _descendants(pid: int) -> list[int]:
    out: list[int] = []
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError, IndexError):
                if int((entry / "stat").read_text().rsplit(")", 1)[-1].split()[1]) == parent:
                    out.append(int(entry.name))
                    frontier.append(int(entry.name))
    return out


class LoadSystem:
    """Router, one worker and the gateway under supervision, on the given services."""

    def __init__(self, settings: Settings, gateway_port: int = 18181, max_inflight: int = 12) -> None:
        self.settings = settings
        self.port = gateway_port
        env = {"FLYWHEEL_TOPIC_PREFIX": settings.topic_prefix, "FLYWHEEL_HOME": str(settings.home.resolve()),
               "FLYWHEEL_KAFKA_PORT": str(settings.kafka_port),
               "FLYWHEEL_KAFKA_CONTROLLER_PORT": str(settings.kafka_controller_port),
               "FLYWHEEL_POSTGRES_PORT": str(settings.postgres_port), "FLYWHEEL_LOG_LEVEL": "WARNING",
               "FLYWHEEL_GATEWAY_MAX_INFLIGHT": str(max_inflight), "FLYWHEEL_GATEWAY_MAX_LAG": "8"}
        self.supervisor = Supervisor([
            ChildSpec("router", ("router",), env),
            ChildSpec("worker", ("worker", "--model", MODEL, "--worker-id", "load-1"), env),
            ChildSpec("gateway", ("gateway", "--port", str(gateway_port)), env)],
            settings.home.resolve() / "logs" / "load")
        self.http = httpx.AsyncClient(base_url=f"http://127.0.0.1:{gateway_port}", timeout=300)

    async def start(self) -> None:
        services = await connect(self.settings, "load", run_migrations=True, create_topics=True)
        await services.close()
        self.supervisor.start_all()
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:  # the gateway is up and a worker answers
            with contextlib.suppress(httpx.HTTPError):
                if (await self.ask(0)).get("status") == 200:
                    return
            await asyncio.sleep(2)
        raise TimeoutError("the system did not answer within 240 s")

    async def stop(self) -> None:
        await self.http.aclose()
        await asyncio.to_thread(self.supervisor.stop_all)

    async def ask(self, i: int) -> dict[str, Any]:
        started = time.monotonic()
        try:
            response = await self.http.post("/v1/chat/completions", json={
                "model": MODEL, "max_tokens": 16, "slo_class": "interactive", "user": f"load-{i % 7}",
                "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]})
            return {"status": response.status_code, "latency_s": time.monotonic() - started}
        except httpx.HTTPError as exc:
            return {"status": 0, "latency_s": time.monotonic() - started, "error": str(exc)}

    async def at_rate(self, rate: float, count: int) -> RateResult:
        rng = random.Random(int(rate * 1000))
        tasks = []
        for i in range(count):
            tasks.append(asyncio.create_task(self.ask(i)))
            await asyncio.sleep(rng.expovariate(rate))
        results = await asyncio.gather(*tasks)
        ok = [r["latency_s"] for r in results if r["status"] == 200]
        return RateResult(rate, count, len(ok), sum(r["status"] == 429 for r in results),
                          sum(r["status"] not in (200, 429) for r in results),
                          percentile(ok, 0.5), percentile(ok, 0.99))

    def rss_mb(self) -> dict[str, float]:
        return {name: _rss_mb(pid) for name in self.supervisor.children
                if (pid := self.supervisor.pid_of(name)) is not None}


async def ramp(system: LoadSystem, rates: tuple[float, ...], seconds_per_rate: float = 30.0,
               max_per_rate: int = 60) -> tuple[list[RateResult], float]:
    results = []
    for rate in rates:
        count = max(4, min(max_per_rate, int(rate * seconds_per_rate)))
        results.append(await system.at_rate(rate, count))
        log.info("%s", results[-1])
        await asyncio.sleep(5)  # drain between steps
    within = [r.rate for r in results if r.within_slo]
    return results, max(within, default=0.0)


async def soak(system: LoadSystem, rate: float, minutes: float, warmup_s: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + warmup_s
    i = 0
    while time.monotonic() < deadline:
        await system.ask(i)
        i += 1
    before = system.rss_mb()
    end = time.monotonic() + minutes * 60
    tasks: list[asyncio.Task[dict[str, Any]]] = []
    while time.monotonic() < end:
        tasks.append(asyncio.create_task(system.ask(i)))
        i += 1
        await asyncio.sleep(1.0 / rate)
    results = await asyncio.gather(*tasks)
    after = system.rss_mb()
    sent, answered = len(results), sum(r["status"] == 200 for r in results)
    growth = {name: (after[name] - before[name]) / before[name] for name in before if name in after}
    return {"minutes": minutes, "rate": rate, "sent": sent, "answered": answered,
            "rss_mb_before": before, "rss_mb_after": after,
            "rss_growth": max(growth.values(), default=0.0), "rss_growth_by_process": growth}
