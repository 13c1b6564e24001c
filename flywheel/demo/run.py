"""Run the demo: the whole system on embedded defaults, a workload of real prompts from simulated
users for a few minutes, a live summary, and a final summary table (or ``--json``).

The demo is ``flywheel up`` plus a driver: it prepares the local services, starts every process
under the supervisor, waits until each model has a live worker, and then lets simulated users
ask questions. Most requests go to ``auto`` (the router decides); some prompts are asked of both
models side by side so the user can state a preference. Every answer gets feedback, which moves
the router's ratings, trains the users' adapters and becomes rewards for the trainer.

Idle baseline. Before the trainer and the personaliser start, the same users ask the same prompts
(the same seeded sequence) for ``idle_duration_s`` without giving feedback: no learning runs, and
those answers' latencies are ``idle_latency_ms`` beside the learning phase's ``latency_ms``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import time
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from core.catalog import CATALOG
from flywheel.client import FlywheelClient, ResponseTimeout
from flywheel.commands.up import children, prepare
from flywheel.demo.workload import DemoPrompt, SimulatedUser, load_prompts, make_users
from flywheel.deployment import plan_workers
from flywheel.gateway.observer import Observer
from flywheel.gateway.stats import ServiceStats
from flywheel.supervisor import Supervisor
from infra.connect import connect
from infra.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoConfig:
    duration_s: float = 240.0
    """How long users keep asking (after every model has a live worker)."""
    users: int = 6
    paired_share: float = 0.25
    """Share of prompts asked of both models for a pairwise preference."""
    max_tokens: int = 48
    think_time_s: float = 2.0
    startup_timeout_s: float = 420.0
    drain_s: float = 60.0
    """After the last request: time for the last answers, adapters and trainer steps to land."""
    seed: int = 0
    idle_duration_s: float = 60.0
    """The no-learning baseline phase (0 = skip it)."""


LEARNERS = ("trainer", "personalizer")
"""Children started only after the idle baseline."""


def latency_summary(values_ms: list[float]) -> dict[str, float]:
    from flywheel.gateway.stats import percentile

    return {"p50": round(percentile(values_ms, 0.5), 1), "p99": round(percentile(values_ms, 0.99), 1),
            "n": len(values_ms)}


DEMO_ENV = {
    # Small batches and short horizons so that learning is visible within a few minutes.
    "FLYWHEEL_TRAINER_BATCH_SIZE": "4",
    "FLYWHEEL_ROLLOUT_SAMPLE": "1",
    "FLYWHEEL_TRAINER_REWARD_TIMEOUT_S": "30",
    "FLYWHEEL_PERSONALIZER_MIN_EVENTS": "3",
    "FLYWHEEL_PERSONALIZER_BASE_BATCH": "2",
    "FLYWHEEL_PERSONALIZER_MIN_BATCH": "0.5",
    "FLYWHEEL_PERSONALIZER_MAX_UPDATES_PER_HOUR": "120",
    "FLYWHEEL_PERSONALIZER_UPDATE_BUDGET_S": "15",
}


def summary_table(snapshot: dict[str, Any], title: str) -> Table:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("served", str(snapshot["served"]))
    table.add_row("requests/s (last minute)", f"{snapshot['requests_per_s']:.2f}")
    latency = snapshot["latency_ms"]
    table.add_row("latency p50 / p99 (ms)", f"{latency['p50']:.0f} / {latency['p99']:.0f}")
    slo = snapshot["slo_attainment"]
    table.add_row("SLO attainment", "–" if slo is None else f"{100 * slo:.1f}%")
    for model, count in sorted(snapshot["models"].items()):
        share = snapshot["routing_shares"].get(model, 0.0)
        table.add_row(f"served by {model}", f"{count} (routed {100 * share:.0f}%)")
    for model, rating in sorted(snapshot["elo"].items()):
        table.add_row(f"router rating {model}", f"{rating:.2f}")
    table.add_row("feedback events", str(snapshot["feedback"]))
    table.add_row("adapters published", str(snapshot["adapters_published"]))
    table.add_row("trainer steps", str(snapshot["trainer_steps"]))
    for model, info in sorted(snapshot["model_versions"].items()):
        table.add_row(f"{model} version", f"{info['version']} (step {info['step']})")
    return table


class Demo:
    def __init__(self, settings: Settings, config: DemoConfig) -> None:
        self.settings = settings
        self.config = config
        self.stats = ServiceStats()
        self.rng = random.Random(config.seed)
        self.prompts = load_prompts(seed=config.seed)
        self.users = make_users(config.users, config.seed)
        self.requests_sent = 0
        self.errors = 0
        self.rejected = 0
        self.shortened = 0
        self.latencies_ms: list[float] = []
        """Latencies of the current phase's answers (as the worker measured them)."""

    async def _wait_for_workers(self, models: set[str]) -> None:
        deadline = time.monotonic() + self.config.startup_timeout_s
        while time.monotonic() < deadline:
            live = {w["model"] for w in self.stats.workers.values() if w["healthy"]}
            if models <= live:
                return
            await asyncio.sleep(1)
        raise TimeoutError(f"workers for {sorted(models - live)} did not start in time")

    async def _ask(self, client: FlywheelClient, user: SimulatedUser, prompt: DemoPrompt,
                   model: str = "auto") -> dict[str, Any] | None:
        self.requests_sent += 1
        try:
            answer = await client.submit(user_id=user.user_id, prompt=prompt.text, max_tokens=self.config.max_tokens,
                                         slo_class="interactive", model_hints=[] if model == "auto" else [model],
                                         timeout_s=300)
        except ResponseTimeout:
            self.errors += 1
            return None
        if answer["finish_reason"] == "error":
            self.errors += 1
            return None
        if answer["finish_reason"] == "deadline":  # admission control refused it, with the reason
            self.rejected += 1
            return None
        self.shortened += int(bool(answer.get("admission")) and "shortened" in answer["admission"])
        self.latencies_ms.append(float(answer["total_ms"]))
        return answer

    async def _user(self, client: FlywheelClient, user: SimulatedUser, until: float, feedback: bool = True) -> None:
        models = sorted(CATALOG)
        rng = random.Random(f"{self.config.seed}-{user.user_id}")  # the same prompts in both phases
        while time.monotonic() < until:
            prompt = rng.choice(self.prompts)
            if rng.random() < self.config.paired_share:
                a, b = await asyncio.gather(*(self._ask(client, user, prompt, m) for m in models))
                if a and b and feedback:
                    await client.feedback(**user.compare(prompt, a, b, self.rng))
            else:
                answer = await self._ask(client, user, prompt)
                if answer and feedback:
                    await client.feedback(**user.feedback(prompt, answer, self.rng))
            await asyncio.sleep(rng.expovariate(1.0 / self.config.think_time_s))

    async def _idle_phase(self, client: FlywheelClient) -> dict[str, float]:
        """The users' prompts with no learning running (no feedback, no trainer, no personaliser)."""
        until = time.monotonic() + self.config.idle_duration_s
        await asyncio.gather(*(self._user(client, u, until, feedback=False) for u in self.users))
        idle = latency_summary(self.latencies_ms)
        self.latencies_ms = []
        return idle

    async def run(self, console: Console | None) -> dict[str, Any]:
        measured = await prepare(self.settings)
        plans = plan_workers(per_token_ms=measured)
        specs = children(self.settings, plans)
        learners = [s for s in specs if s.name in LEARNERS] if self.config.idle_duration_s > 0 else []
        supervisor = Supervisor([s for s in specs if s not in learners], self.settings.home.resolve() / "logs",
                                base_env={**os.environ, **DEMO_ENV})
        idle: dict[str, float] = {}
        services = await connect(self.settings, "flywheel-demo")
        observer = Observer(services, self.stats)
        await observer.start()
        client = FlywheelClient(services)
        await client.start()
        stop = asyncio.Event()
        supervising = asyncio.create_task(supervisor.run(stop))
        elo_start: dict[str, float] = {}
        try:
            with Live(summary_table(self.stats.snapshot(), "Flywheel demo: starting"), console=console,
                      refresh_per_second=1, transient=False) if console else contextlib.nullcontext() as live:
                async def refresh(phase: str) -> None:
                    if live is not None:
                        live.update(summary_table(self.stats.snapshot(), f"Flywheel demo: {phase}"))

                waiter = asyncio.create_task(self._wait_for_workers({p.model for p in plans}))
                while not waiter.done():
                    await refresh("loading models")
                    await asyncio.sleep(1)
                await waiter
                if learners:
                    idle_task = asyncio.create_task(self._idle_phase(client))
                    while not idle_task.done():
                        await refresh("idle baseline (no learning)")
                        await asyncio.sleep(1)
                    idle = await idle_task
                    for spec in learners:
                        supervisor.add(spec)
                    self.stats.latencies_ms.clear()
                elo_start = dict(self.stats.elo)
                until = time.monotonic() + self.config.duration_s
                users = [asyncio.create_task(self._user(client, u, until)) for u in self.users]
                while not all(t.done() for t in users):
                    if not elo_start:  # the ratings in the first routing decisions of this run
                        elo_start = dict(self.stats.elo)
                    await refresh(f"serving ({max(0, until - time.monotonic()):.0f} s left)")
                    await asyncio.sleep(1)
                await asyncio.gather(*users)
                drain_until = time.monotonic() + self.config.drain_s
                while time.monotonic() < drain_until and not (self.stats.adapters_published and
                                                               self.stats.trainer_steps):
                    await refresh("draining")
                    await asyncio.sleep(1)
                await refresh("done")
        finally:
            await client.close()
            await observer.stop()
            await services.close()
            stop.set()
            await supervising
        snapshot = self.stats.snapshot()
        return {
            "served": snapshot["served"],
            "requests_sent": self.requests_sent,
            "errors": self.errors,
            "models": snapshot["models"],
            "routing_shares": snapshot["routing_shares"],
            "latency_ms": snapshot["latency_ms"],
            "idle_latency_ms": idle,
            "answered_latency_ms": latency_summary(self.latencies_ms),
            "rejected": self.rejected,
            "shortened": self.shortened,
            "slo_attainment": snapshot["slo_attainment"],
            "adapters_published": snapshot["adapters_published"],
            "trainer_steps": snapshot["trainer_steps"],
            "elo": snapshot["elo"],
            "elo_start": elo_start,
            "feedback": snapshot["feedback"],
            "restarts": {name: s["restarts"] for name, s in supervisor.status().items()},
        }
