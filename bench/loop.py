"""``flywheel bench loop``: does the fleet get better from its own feedback? (the closed loop)

Simulated users (``bench.loop_users``: a hidden task stream with checkable answers and a taste for
answer length) drive the real system end to end: the OpenAI client against the gateway -> Kafka ->
router -> workers on the real models -> responses; their feedback goes back through the public
``POST /v1/feedback`` -> router, personaliser, rewarder, trainer. The same seeded users face several
**arms**, one after the other, each started from a clean state:

* ``frozen``        nothing learns (the router keeps its initial ratings and does not explore);
* ``router``        only routing learns (Eagle ratings + exploration);
* ``personaliser``  only the per-user adapters learn (ASLS);
* ``trainer``       only the policy learns (rewarder + reward model -> PPO trainer);
* ``all``           everything learns.

Isolation: each arm gets its own topic prefix, its own Postgres database (created, migrated, and
dropped afterwards) and its own processes (router, one worker per model, gateway, and the arm's
learners, supervised as under ``flywheel up``); the broker and Postgres server are shared.

Reported per window of requests: mean user reward, task accuracy, cost per request (catalogue
prices, regenerations included), latency p50/p99 (client side), routing share per topic and
model; and how long feedback takes to have an effect: feedback -> the router applied it (journal
row written), -> the user's new adapter served (first response that carries it), -> a new model
version served. See docs/BENCHMARKS.md for the recorded run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import logging
import os
import socket
import statistics
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from pydantic import SecretStr

from bench.loop_report import Interaction, curves, lift, percentile, spread, windows, write_svg
from bench.loop_users import LoopUser, make_users
from bench.task_accuracy import DEFAULT_TASKS
from bench.tasks import Task, load_tasks
from core.catalog import CATALOG
from flywheel.commands.up import children
from flywheel.deployment import plan_workers
from flywheel.supervisor import Supervisor
from infra.connect import connect, database_url
from infra.runtime import run_async, setup_logging
from infra.services import local_services
from infra.settings import Settings, get_settings
from streams.replay import read_topics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Learners:
    router: bool = False
    personaliser: bool = False
    trainer: bool = False


ARMS: dict[str, Learners] = {
    "frozen": Learners(),
    "router": Learners(router=True),
    "personaliser": Learners(personaliser=True),
    "trainer": Learners(trainer=True),
    "all": Learners(router=True, personaliser=True, trainer=True),
}

LOOP_ENV = {
    # Learners sized for a benchmark of a few hundred requests per arm (production defaults wait
    # for more evidence): the personaliser updates after a few events, the trainer steps on
    # small batches, every response is a rollout.
    "FLYWHEEL_PERSONALIZER_MIN_EVENTS": "3",
    "FLYWHEEL_PERSONALIZER_BASE_BATCH": "2",
    "FLYWHEEL_PERSONALIZER_MIN_BATCH": "0.5",
    "FLYWHEEL_PERSONALIZER_MAX_UPDATES_PER_HOUR": "600",
    "FLYWHEEL_PERSONALIZER_UPDATE_BUDGET_S": "8",
    "FLYWHEEL_TRAINER_BATCH_SIZE": "8",
    "FLYWHEEL_ROLLOUT_SAMPLE": "1",
    "FLYWHEEL_TRAINER_REWARD_TIMEOUT_S": "30",
    "FLYWHEEL_LOG_LEVEL": "WARNING",
}


@dataclass(frozen=True)
class LoopConfig:
    tasks: list[Task]
    requests: int = 600
    """Asks per arm (regenerations come on top)."""
    users: int = 8
    window: int = 200
    max_tokens: int = 32
    seeds: tuple[int, ...] = (0, 1, 2)
    arms: tuple[str, ...] = tuple(ARMS)
    request_timeout_s: float = 180.0
    startup_timeout_s: float = 600.0
    drain_s: float = 15.0
    """After the last ask: time for the last effects (adapters, steps) to be observable."""
    logs: Path = field(default_factory=lambda: Path(".flywheel") / "logs" / "loop")

    def __post_init__(self) -> None:
        unknown = [a for a in self.arms if a not in ARMS]
        if unknown:
            raise ValueError(f"unknown arms {unknown}; known: {list(ARMS)}")
        if "frozen" not in self.arms:
            raise ValueError("the frozen arm is the baseline every lift is measured against; include it")
        if self.requests < self.users or self.window < 1:
            raise ValueError(f"need requests >= users and window >= 1; got requests={self.requests} "
                             f"users={self.users} window={self.window}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tasks", type=Path, default=DEFAULT_TASKS, help="folder of task JSONL files")
    parser.add_argument("--requests", type=int, default=600, help="asks per arm (default 600)")
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--window", type=int, default=200, help="requests per learning-curve window")
    parser.add_argument("--seed", type=int, action="append", help="a seed (repeat for several; default 0 1 2)")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {','.join(ARMS)}")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--plot", type=Path, help="write the learning curves here (.svg)")
    parser.add_argument("--partial", type=Path,
                        help="after every arm run, write the summary of the runs so far here (JSON): a long run "
                             "that is cut short still leaves its finished seeds")
    parser.add_argument("--quick", action="store_true",
                        help="CI smoke test: 16 requests, 4 users, window 8, seed 0, arms frozen and all")


def config_from_args(args: argparse.Namespace) -> LoopConfig:
    tasks = load_tasks(args.tasks)
    if args.quick:
        return LoopConfig(tasks, requests=16, users=4, window=8, seeds=(0,), arms=("frozen", "all"),
                          max_tokens=args.max_tokens, drain_s=5.0)
    arms = tuple(a.strip() for a in args.arms.split(",") if a.strip())
    return LoopConfig(tasks, requests=args.requests, users=args.users, window=args.window,
                      seeds=tuple(args.seed or (0, 1, 2)), arms=arms, max_tokens=args.max_tokens)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _with_database(url: str, name: str) -> str:
    base, _, _ = url.rpartition("/")
    return f"{base}/{name}"


@dataclass
class ArmOutcome:
    records: list[Interaction]
    router_s: list[float]
    adapter_s: list[float]
    model_s: list[float]
    adapters: int
    model_versions: int
    restarts: int


class ArmRun:
    """One arm, one seed: fresh database and topics, the processes, the users, the effects."""

    def __init__(self, settings: Settings, config: LoopConfig, arm: str, seed: int, run_id: str) -> None:
        self.settings = settings
        self.config = config
        self.arm = arm
        self.learners = ARMS[arm]
        self.seed = seed
        self.prefix = f"loop{run_id}-{arm}-s{seed}."
        self.database = f"loop_{run_id}_{arm}_s{seed}"
        self.port = _free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.counter = itertools.count()
        self.records: list[Interaction] = []
        self.feedback_posted: dict[str, float] = {}  # feedback id -> POST time
        self.feedback_by_request: dict[str, list[float]] = defaultdict(list)  # request id -> POST times
        self.served: list[tuple[float, str, dict[str, Any]]] = []  # (received at, user, flywheel extras)

    # -- set-up and tear-down ----------------------------------------------------------------------
    async def _create_database(self, admin_url: str) -> str:
        conn = await asyncpg.connect(admin_url)
        try:
            await conn.execute(f'CREATE DATABASE "{self.database}"')
        finally:
            await conn.close()
        return _with_database(admin_url, self.database)

    async def _drop_database(self, admin_url: str) -> None:
        conn = await asyncpg.connect(admin_url)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')
        finally:
            await conn.close()

    def _env(self, url: str) -> dict[str, str]:
        return {**os.environ, **LOOP_ENV, "FLYWHEEL_TOPIC_PREFIX": self.prefix, "FLYWHEEL_DATABASE_URL": url,
                "FLYWHEEL_GATEWAY_PORT": str(self.port), "FLYWHEEL_METRICS_PORT": "0",
                "FLYWHEEL_ROUTER_LEARN": "true" if self.learners.router else "false"}

    def _children(self) -> list[Any]:
        specs = children(self.settings, plan_workers(), trainer=self.learners.trainer, gateway=True)
        drop = set()
        if not self.learners.personaliser:
            drop.add("personalizer")
        if not self.learners.trainer:
            drop.add("rewarder")
        return [s for s in specs if s.name not in drop]

    async def _wait_ready(self, http: httpx.AsyncClient) -> None:
        deadline = time.monotonic() + self.config.startup_timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                models = (await http.get(f"{self.base_url}/v1/models", timeout=5)).json()["data"]
                if all(m.get("live") for m in models if m["id"] in CATALOG):
                    return
            await asyncio.sleep(1.0)
        raise TimeoutError(f"{self.arm}: workers not live after {self.config.startup_timeout_s:.0f}s")

    # -- one user ------------------------------------------------------------------------------------
    async def _ask(self, openai: Any, user: LoopUser, task: Task, regenerate: bool, step: int
                   ) -> tuple[str, str, str, float, dict[str, Any]] | None:
        """(request id, model, text, latency ms, flywheel extras) or None on an error."""
        started = time.monotonic()
        try:
            response = await openai.chat.completions.create(
                model="auto", messages=[{"role": "user", "content": task.prompt}],
                max_tokens=self.config.max_tokens, user=user.user_id,
                temperature=0.7 if regenerate else 0.0, seed=step if regenerate else None,
                extra_body={"slo_class": "interactive"})
        except Exception as exc:  # a timeout or an error answer: counted, the user moves on
            log.warning("%s: %s's ask failed: %s", self.arm, user.user_id, exc)
            return None
        extras: dict[str, Any] = (response.model_extra or {}).get("flywheel", {})
        self.served.append((time.time(), user.user_id, extras))
        return (response.id, response.model, response.choices[0].message.content or "",
                (time.monotonic() - started) * 1000.0, extras)

    async def _feedback(self, http: httpx.AsyncClient, user: LoopUser, body: dict[str, Any]) -> None:
        posted = time.time()
        reply = await http.post(f"{self.base_url}/v1/feedback", json=body, headers={"x-flywheel-user": user.user_id})
        if reply.status_code != 200:
            log.warning("%s: feedback refused (%d): %s", self.arm, reply.status_code, reply.text[:200])
            return
        self.feedback_posted[reply.json()["feedback_id"]] = posted
        self.feedback_by_request[body["request_id"].removeprefix("chatcmpl-")].append(posted)

    async def _user(self, openai: Any, http: httpx.AsyncClient, user: LoopUser) -> None:
        for step, task in enumerate(user.tasks):
            index = next(self.counter)
            first = await self._ask(openai, user, task, False, step)
            if first is None:
                self.records.append(Interaction(index, user.user_id, task.topic, "none", 0.0, False, 0.0,
                                                self.config.request_timeout_s * 1000, error=True))
                continue
            rid, model, text, latency, extras = first
            cost = float(extras.get("cost_usd", 0.0))
            verdict = user.react(step, task, rid, text)
            if verdict.edit is not None:
                await self._feedback(http, user, verdict.edit)
            if verdict.feedback is not None:
                await self._feedback(http, user, verdict.feedback)
            if verdict.regenerate:
                second = await self._ask(openai, user, task, True, step)
                if second is not None:
                    cost += float(second[4].get("cost_usd", 0.0))
                    pair = user.compare(step, task, (rid, model, text), second[:3])
                    follow = pair or user.react(step, task, second[0], second[2], second=True).feedback
                    if follow is not None:
                        await self._feedback(http, user, follow)
            self.records.append(Interaction(index, user.user_id, task.topic, model, user.reward(task, text),
                                            task.is_correct(text), cost, latency,
                                            extra={"adapter": extras.get("adapter_version"),
                                                   "version": extras.get("model_version")}))

    # -- effects -------------------------------------------------------------------------------------
    async def _router_latencies(self, url: str) -> list[float]:
        if not self.learners.router:
            return []
        conn = await asyncpg.connect(url)
        try:
            rows = await conn.fetch("SELECT feedback_id, created_at FROM router_feedback")
        finally:
            await conn.close()
        return [r["created_at"].timestamp() - self.feedback_posted[r["feedback_id"]]
                for r in rows if r["feedback_id"] in self.feedback_posted]

    def _first_served(self, user: str | None, key: str, value: str) -> float | None:
        times = [t for t, u, extras in self.served if (user is None or u == user) and extras.get(key) == value]
        return min(times) if times else None

    async def _state_events(self, child: Settings, topic: str) -> list[dict[str, Any]]:
        services = await connect(child, "flywheel-bench-loop")
        try:
            return [(await services.serde.deserialize(r.value))[1]
                    for r in await read_topics(services.kafka, [topic])]
        finally:
            await services.close()

    def _adapter_latencies(self, adapters: list[dict[str, Any]]) -> list[float]:
        out = []
        for event in adapters:
            posted = self.feedback_by_request.get(str(event["correlation_id"]))
            live = self._first_served(event["user_id"], "adapter_version", event["adapter_hash"])
            if posted and live is not None and event["adapter_hash"]:
                before = [t for t in posted if t <= live]
                if before:
                    out.append(live - max(before))
        return out

    def _model_latencies(self, models: list[dict[str, Any]]) -> list[float]:
        out = []
        posted = sorted(self.feedback_posted.values())
        for event in models:
            live = self._first_served(None, "model_version", event["version"])
            published = event["event_time"] / 1000.0 if isinstance(event["event_time"], int) \
                else event["event_time"].timestamp()
            before = [t for t in posted if t <= published]
            if live is not None and before:
                out.append(live - before[-1])
        return out

    async def run(self) -> ArmOutcome:
        admin_url = database_url(self.settings)
        url = await self._create_database(admin_url)
        child = self.settings.model_copy(update={"topic_prefix": self.prefix, "database_url": SecretStr(url)})
        services = await connect(child, "flywheel-bench-loop", run_migrations=True, create_topics=True)
        await services.close()
        users = make_users(self.config.tasks, self.config.users, self.config.requests, self.seed)
        log_dir = self.config.logs.resolve() / f"{self.arm}-s{self.seed}"
        supervisor = Supervisor(self._children(), log_dir, base_env=self._env(url))
        stop = asyncio.Event()
        supervising = asyncio.create_task(supervisor.run(stop))
        from openai import AsyncOpenAI

        try:
            async with httpx.AsyncClient(timeout=30.0) as http:
                await self._wait_ready(http)
                openai = AsyncOpenAI(base_url=f"{self.base_url}/v1", api_key="loop-bench", max_retries=0,
                                     timeout=self.config.request_timeout_s)
                started = time.monotonic()
                await asyncio.gather(*(self._user(openai, http, u) for u in users))
                log.warning("%s seed %d: %d asks in %.0fs", self.arm, self.seed, len(self.records),
                            time.monotonic() - started)
                await asyncio.sleep(self.config.drain_s)
                await openai.close()
            router_s = await self._router_latencies(url)
            adapters = await self._state_events(child, child_catalog_topic(child, "adapters"))
            models = await self._state_events(child, child_catalog_topic(child, "models"))
        finally:
            stop.set()
            await supervising
            with contextlib.suppress(Exception):
                await self._drop_database(admin_url)
        restarts = sum(int(str(s["restarts"])) for s in supervisor.status().values())
        return ArmOutcome(self.records, router_s, self._adapter_latencies(adapters),
                          self._model_latencies(models), sum(1 for a in adapters if a["adapter_hash"]),
                          len(models), restarts)


def child_catalog_topic(settings: Settings, which: str) -> str:
    from infra.connect import topic_catalog

    catalog = topic_catalog(settings)
    return catalog.adapters if which == "adapters" else catalog.models_topic


def _latency_summary(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"n": 0, "p50": None, "p95": None}
    return {"n": len(values), "p50": round(percentile(values, 0.5), 3), "p95": round(percentile(values, 0.95), 3)}


def summarise(config: LoopConfig, outcomes: dict[int, dict[str, ArmOutcome]]) -> dict[str, Any]:
    per_seed: dict[str, Any] = {}
    arm_curves: dict[str, dict[str, list[list[Any]]]] = defaultdict(lambda: defaultdict(list))
    finals: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    effects: dict[str, list[float]] = {"router": [], "adapter": [], "model": []}
    for seed, arms in outcomes.items():
        per_seed[str(seed)] = {}
        for arm, outcome in arms.items():
            per_window = windows(outcome.records, config.window)
            per_seed[str(seed)][arm] = {
                "windows": per_window, "adapters_published": outcome.adapters,
                "model_versions": outcome.model_versions, "restarts": outcome.restarts,
                "errors": sum(r.error for r in outcome.records)}
            for metric, values in curves(per_window).items():
                arm_curves[arm][metric].append(values)
            last = per_window[-1]
            for metric in ("reward", "accuracy", "cost"):
                finals[arm][metric].append(last[metric])
            effects["router"] += outcome.router_s
            effects["adapter"] += outcome.adapter_s
            effects["model"] += outcome.model_s
    arms_out: dict[str, Any] = {}
    for arm, metrics in arm_curves.items():
        arms_out[arm] = {}
        for metric, runs in metrics.items():
            if metric == "latency_ms":
                arms_out[arm][metric] = [{"p50": statistics.fmean(w[i]["p50"] for w in runs),
                                          "p99": statistics.fmean(w[i]["p99"] for w in runs)}
                                         for i in range(min(len(w) for w in runs))]
            else:
                arms_out[arm][metric] = [statistics.fmean(run[i] for run in runs)
                                         for i in range(min(len(run) for run in runs))]
    final = {arm: {m: statistics.fmean(v) for m, v in metrics.items()} for arm, metrics in finals.items()}
    first_seed = next(iter(outcomes.values()))
    n = len(next(iter(first_seed.values())).records)
    return {
        "config": {"requests": config.requests, "users": config.users, "window": config.window,
                   "max_tokens": config.max_tokens, "tasks": len(config.tasks), "arms": list(config.arms)},
        "windows": [{"index": i, "start": s, "end": min(n, s + config.window)}
                    for i, s in enumerate(range(0, n, config.window))],
        "arms": arms_out,
        "final": final,
        "final_spread": {arm: {m: spread(v) for m, v in metrics.items()} for arm, metrics in finals.items()},
        "lift": lift(final, "reward"),
        "accuracy_lift": lift(final, "accuracy"),
        "cost_ratio": lift(final, "cost"),
        "seeds": list(outcomes),
        "effect_latency_s": {k: _latency_summary(v) for k, v in effects.items()},
        "per_seed": per_seed,
    }


def plot(result: dict[str, Any], path: Path, window: int) -> None:
    """Reward and accuracy curves per arm (mean over seeds, min-max band)."""
    for metric in ("reward", "accuracy"):
        bands: dict[str, list[tuple[float, float]]] = {}
        for arm in result["arms"]:
            runs = [seed[arm]["windows"] for seed in result["per_seed"].values() if arm in seed]
            n = min(len(r) for r in runs)
            bands[arm] = [(min(r[i][metric] for r in runs), max(r[i][metric] for r in runs)) for i in range(n)]
        target = path if metric == "reward" else path.with_name(f"{path.stem}-accuracy{path.suffix}")
        write_svg(target, {arm: result["arms"][arm][metric] for arm in result["arms"]},
                  f"Closed loop: mean user {metric} per window", metric, window, bands)


async def _main(config: LoopConfig, settings: Settings, partial: Path | None = None) -> dict[str, Any]:
    run_id = uuid.uuid4().hex[:6]
    outcomes: dict[int, dict[str, ArmOutcome]] = {}
    for seed in config.seeds:
        outcomes[seed] = {}
        for arm in config.arms:
            outcomes[seed][arm] = await ArmRun(settings, config, arm, seed, run_id).run()
            if partial is not None:
                done = {s: arms for s, arms in outcomes.items() if len(arms) == len(config.arms)}
                if done:  # only complete seeds: every lift compares arms of the same seeds
                    partial.write_text(json.dumps(summarise(config, done)))
    return summarise(config, outcomes)


def run(args: argparse.Namespace) -> dict[str, Any]:
    setup_logging("WARNING")
    config = config_from_args(args)
    settings = get_settings()
    with local_services(settings):
        result = run_async(_main(config, settings, args.partial))
    if args.plot:
        plot(result, args.plot, config.window)
        result["plot"] = str(args.plot)
    log.info("%s", json.dumps(result["final"]))
    return result
