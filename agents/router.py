"""The router agent (default ranker: local quality with bounded exploration; Eagle on request).

    requests --(stage loop: validate -> embed -> rank once -> decision)--> decisions.<model>
    feedback --(global reader, journalled in Postgres)--> ratings
    heartbeats --(global reader)--> which models have a healthy worker

Requests are handled in small batches (one embedding call per batch). Each request is ranked once:
the decision carries the scores of that one pass for every candidate, the fallbacks, the reason,
whether the choice was exploratory, and the offset of the last feedback applied, so it can be
explained and reproduced (the exploration draw is a function of the request id). Models without a
healthy worker are skipped (next best); with no live worker at all the request waits (up to
``ROUTER_WAIT_S``, Kafka holds the rest) and is then queued for the best model. A request whose
budget cannot pay for a single token of any model is answered directly with an error response
instead of being routed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import numpy as np
import torch
from aiokafka import AIOKafkaConsumer

from agents.router_feedback import FeedbackApplier, load_state, prompt_key
from core.catalog import CATALOG, ModelSpec
from core.embedding import get_embedder
from core.errors import DeadLetterError, RetriableError
from core.routing.budget import RouteChoice
from core.routing.eagle import EagleConfig
from core.routing.local_quality import LocalQualityConfig, LocalQualityRanker
from core.routing.state import RouterConfig, algorithm_of
from core.slo import SloCheck
from core.validation import RequestLimits, validate_request
from infra.connect import Services, run_until_stopped
from infra.metrics import start_metrics
from infra.runtime import run_async, setup_logging
from infra.settings import Settings
from infra.telemetry import REQUESTS_ROUTED, ROUTING_SECONDS
from streams.dlq import DeadLetters
from streams.events import envelope, event_time_ms, prompt_text
from streams.kafka import EventConsumer, EventProducer, Received, fetch_committed
from streams.stage_loop import Output, StageConfig, StageLoop
from streams.tracing import process_context, setup_tracing

log = logging.getLogger(__name__)
ROUTER_CONFIG: RouterConfig = LocalQualityConfig()
"""The default router, as evaluated in docs/bench/routing.md (docs/ROUTING.md says why it won).
``EagleConfig(neighbours=40)`` runs Eagle as benchmarked instead."""
ROUTER_NAME = algorithm_of(ROUTER_CONFIG)


def router_config(algorithm: str) -> RouterConfig:
    """The live router's configuration for ``FLYWHEEL_ROUTER_ALGORITHM``."""
    if algorithm == "eagle":
        return EagleConfig(neighbours=40)
    if algorithm == "local_quality":
        return ROUTER_CONFIG
    raise ValueError(f"unknown router algorithm {algorithm!r}; known: local_quality, eagle")


def journal_name(services: Services, config: RouterConfig = ROUTER_CONFIG) -> str:
    """The router's journal key: one per deployment (topic prefix) and algorithm, since offsets are
    per topic and each algorithm keeps its own state."""
    return f"{services.settings.topic_prefix}{algorithm_of(config)}"


ROUTER_WAIT_S = 30.0
HEARTBEAT_STALE_S = 10.0


def prompt_tokens_upper_bound(request: dict[str, Any]) -> int:
    """Characters / 2: generous for BPE tokenizers (about 4 characters per token in English)."""
    chars = len(request.get("prompt") or "") + sum(len(m["content"]) for m in request.get("messages") or [])
    return chars // 2 + 8


def estimate_cost(spec: ModelSpec, request: dict[str, Any]) -> float:
    """Worst-case cost: an upper bound of the prompt's tokens and the full ``max_tokens`` of output
    (the worker never generates more), so a request routed within budget cannot overspend it."""
    return spec.cost(prompt_tokens_upper_bound(request), request["max_tokens"])


def affordable_tokens(spec: ModelSpec, request: dict[str, Any], budget_usd: float) -> int:
    """The most output tokens ``budget_usd`` pays for on ``spec`` after the prompt (may be <= 0)."""
    left = budget_usd * 1e6 - prompt_tokens_upper_bound(request) * spec.price_in_per_mtok
    return int(left // spec.price_out_per_mtok)


@dataclass
class Liveness:
    """Healthy workers per model, from heartbeats (a worker is live until it goes quiet)."""

    last_seen: dict[str, tuple[str, float, bool]] = field(default_factory=dict)  # worker -> (model, t, healthy)

    def on_heartbeat(self, event: dict[str, Any], now: float) -> None:
        self.last_seen[event["worker_id"]] = (event["model"], now, event["healthy"])

    def live_models(self, now: float) -> set[str]:
        stale = max(HEARTBEAT_STALE_S, 0.0)
        return {model for model, seen, healthy in self.last_seen.values() if healthy and now - seen <= stale}


class Router:
    def __init__(self, services: Services, config: RouterConfig | None = None) -> None:
        self.services = services
        self.config = config or router_config(services.settings.router_algorithm)
        self.models = tuple(services.catalog.models)
        self.limits = RequestLimits(services.settings.max_prompt_chars, services.settings.max_tokens_limit)
        self.liveness = Liveness()
        self.slo = SloCheck(stale_s=HEARTBEAT_STALE_S)
        """Workers' calibrated speeds and backlogs: prefer models predicted to meet the deadline."""
        self.embedder = get_embedder()
        self.name = algorithm_of(self.config)
        c = self.config
        self.version = (f"eagle-k{c.k:g}-n{c.neighbours}-p{c.global_weight:g}" if isinstance(c, EagleConfig)
                        else f"local_quality-n{c.neighbours}-c{'.'.join(map(str, c.clusters))}-h{c.horizon}"
                        f"-e{c.explore_share:g}")
        self.applier: FeedbackApplier | None = None

    async def start(self, dlq: DeadLetters, stop: asyncio.Event) -> list[asyncio.Task[None]]:
        name = journal_name(self.services, self.config)
        state, offset = await load_state(self.services.pool, name, self.config, self.models)
        self.applier = FeedbackApplier(self.services, state, offset, name, self.embedder, dlq)
        tasks = [asyncio.create_task(self._follow_heartbeats(stop), name="router-heartbeats")]
        if self.services.settings.router_learn:
            tasks.append(asyncio.create_task(self.applier.run(stop), name="router-feedback"))
        else:
            log.warning("router learning is off (FLYWHEEL_ROUTER_LEARN=false): ratings stay as loaded")
        return tasks

    async def _follow_heartbeats(self, stop: asyncio.Event) -> None:
        consumer = AIOKafkaConsumer(self.services.catalog.heartbeats, **self.services.kafka.client_kwargs(),
                                    group_id=None, auto_offset_reset="earliest")
        await consumer.start()
        try:
            while not stop.is_set():
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    for r in records:
                        try:
                            _, event = await self.services.serde.deserialize(r.value)
                        except DeadLetterError:
                            continue  # heartbeats are advisory; a bad one only misses an update
                        # Old heartbeats replayed at start are dated by their own time, so they age out.
                        self.liveness.on_heartbeat(event, min(time.time(), event_time_ms(event) / 1000))
                        self.slo.on_heartbeat(event, min(time.time(), event_time_ms(event) / 1000))
        finally:
            await consumer.stop()

    async def wait_for_live(self, timeout_s: float = ROUTER_WAIT_S) -> set[str]:
        deadline = time.monotonic() + timeout_s
        while True:
            live = self.liveness.live_models(time.time())
            if live or time.monotonic() > deadline:
                return live
            await asyncio.sleep(0.2)

    def candidates(self, request: dict[str, Any]) -> dict[str, float]:
        names = [m for m in request.get("model_hints") or [] if m in CATALOG] or list(self.models)
        return {m: estimate_cost(CATALOG[m], request) for m in names}

    async def route(self, request: dict[str, Any], embedding: np.ndarray) -> dict[str, Any]:
        """A RoutingDecision for one validated request, or an error InferenceResponse."""
        assert self.applier is not None
        candidates = self.candidates(request)
        budget = request.get("budget_usd")
        if budget is not None and all(cost > budget for cost in candidates.values()):
            # Nothing fits at the requested length: shorten the answer to what the budget buys.
            best = max(affordable_tokens(CATALOG[m], request, budget) for m in candidates)
            if best < 1:
                return self.refusal(request, f"a budget of ${budget:g} cannot pay for this prompt on any model")
            request = dict(request, max_tokens=min(request["max_tokens"], best))
            candidates = self.candidates(request)
        live = self.liveness.live_models(time.time()) or await self.wait_for_live()
        live, slo_note = self.slo.prefer_feasible(live, request, time.time())
        choice = self.rank_once(embedding, candidates, budget, request, live)
        if slo_note:
            choice = dataclasses.replace(choice, reason=f"{choice.reason}; {slo_note}")
        return {
            **envelope(request["request_id"], request["tenant_id"], request["user_id"]),
            "request": request,
            "model": choice.model,
            "candidates": [{
                "model": m, "score": choice.scores[m],
                "global_rating": choice.global_scores[m], "local_rating": choice.local_scores[m],
                "expected_quality": choice.expected_quality[m], "expected_cost_usd": choice.costs[m],
                "live": m in live, "within_budget": budget is None or choice.costs[m] <= budget}
                for m in sorted(choice.scores)],
            "exploratory": choice.exploratory,
            "fallbacks": list(choice.fallbacks),
            "router_name": self.name,
            "router_version": self.version,
            "reason": choice.reason,
            "feedback_offset": self.applier.offset,
        }

    def rank_once(self, embedding: np.ndarray, candidates: dict[str, float], budget: float | None,
                  request: dict[str, Any], live: set[str]) -> RouteChoice:
        """The one ranking pass of a request. With no live worker at all, the request is queued for
        the model the rule prefers among every candidate (Kafka holds it until a worker starts)."""
        assert self.applier is not None
        ranker = self.applier.state.ranker
        wtp = request.get("willingness_to_pay")
        usable = live & set(candidates)
        pool = usable or set(candidates)
        if isinstance(ranker, LocalQualityRanker):
            choice = ranker.route(embedding, candidates, budget, wtp, pool, request_id=request["request_id"])
        else:
            choice = ranker.route(embedding, candidates, budget, wtp, pool)
        if not usable:
            choice = dataclasses.replace(choice, reason=f"no live worker: queued for {choice.model}")
        return choice

    @staticmethod
    def refusal(request: dict[str, Any], why: str) -> dict[str, Any]:
        return {**envelope(request["request_id"], request["tenant_id"], request["user_id"]),
                "request_id": request["request_id"], "model": "none", "model_version": "none",
                "adapter_version": None, "text": "", "prompt_tokens": 0, "completion_tokens": 0, "queue_ms": 0.0,
                "first_token_ms": 0.0, "total_ms": 0.0, "finish_reason": "error", "worker_id": ROUTER_NAME,
                "cost_usd": 0.0, "error": why}

    async def remember_embeddings(self, items: list[tuple[str, str, np.ndarray]]) -> None:
        await self.services.pool.executemany(
            "INSERT INTO request_embeddings (request_id, prompt_key, embedding) VALUES ($1, $2, $3) "
            "ON CONFLICT (request_id) DO NOTHING", items)


class RouterStage:
    """The router process: requests -> decisions on the shared stage loop, beside its readers.

    Each fetched batch (up to ``max_records`` requests) is validated (a bad request becomes a dead
    letter with the reason), embedded in one call, its embeddings stored in one statement, and
    ranked; its decisions (or refusals) and the offsets they finish commit in ONE transaction on
    Apache Kafka. Committing per batch, not on a timer, is what keeps the router hop short: faust's
    periodic exactly-once commit held every decision back for 0.5 to 1.2 s (docs/bench/request-plane.md).
    A Postgres outage is retried (``RetriableError``); any other error ends the process without
    committing, for the supervisor to restart it (the batch is re-read).
    """

    def __init__(self, services: Services, config: StageConfig | None = None) -> None:
        self.catalog = services.catalog
        self.router = Router(services)
        self.group = f"{services.settings.topic_prefix}flywheel-router"
        self.consumer = EventConsumer(services.kafka, services.serde, [], group_id=self.group,
                                      capabilities=services.capabilities)
        # One transactional id per router instance: a restarted router fences its predecessor, and
        # replicas (one per host or container by default) never fence each other.
        instance = services.settings.router_instance or socket.gethostname()
        self.producer = EventProducer(services.kafka, services.serde, services.capabilities,
                                      transactional_id=f"{self.group}-{instance}")
        self.plain = EventProducer(services.kafka, services.serde, services.capabilities)
        self.dlq = DeadLetters(self.plain, self.catalog.dlq("router"), "router")
        self.stage = StageLoop(self.consumer, self.producer, self.dlq, self.group,
                               config or StageConfig("router", batch_timeout_ms=50, max_records=64),
                               committed=lambda tps: fetch_committed(services.kafka, self.group, tps))
        self.stop = asyncio.Event()

    async def handle(self, batch: list[Received]) -> list[Output]:
        """Route one batch: validate each request, embed them together, rank each once."""
        valid: list[tuple[Received, dict[str, Any]]] = []
        for item in batch:
            request = item.event
            assert request is not None  # the loop dead-letters undecodable records before us
            try:
                validate_request(request, self.router.limits)
            except DeadLetterError as exc:
                await self.stage.dead_letter(item, exc)
                continue
            valid.append((item, request))
        if not valid:
            return []
        started = time.perf_counter()
        texts = [prompt_text(r) for _, r in valid]
        vectors = self.router.embedder.embed(texts)
        try:
            await self.router.remember_embeddings([(r["request_id"], prompt_key(t), v)
                                                   for (_, r), t, v in zip(valid, texts, vectors, strict=True)])
        except (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError) as exc:
            raise RetriableError(f"cannot store the prompt embeddings: {exc}") from exc
        outputs = []
        for (item, request), vector in zip(valid, vectors, strict=True):
            r = item.record
            with process_context(r.topic, item.headers, r.partition, r.offset, self.group):
                out = await self.router.route(request, vector)
            if "candidates" in out:
                outputs.append(Output(self.catalog.decisions(out["model"]), out, request["request_id"], item))
                REQUESTS_ROUTED.labels(out["model"], out["reason"].split(":")[0][:40]).inc()
            else:
                outputs.append(Output(self.catalog.responses, out, request["request_id"], item))
                REQUESTS_ROUTED.labels("none", "refused").inc()
        ROUTING_SECONDS.observe((time.perf_counter() - started) / len(valid))
        return outputs

    async def run(self) -> None:
        await self.plain.start()
        await self.producer.start()
        readers = await self.router.start(self.dlq, self.stop)  # ratings loaded before the first request
        self.stage.subscribe([self.catalog.requests])
        await self.consumer.start()
        loop = asyncio.create_task(self.stage.run(self.handle, self.stop), name="router-requests")
        try:
            # The readers (feedback, heartbeats) are part of the router: if one fails, the process
            # fails and its supervisor restarts it, rather than routing on frozen ratings.
            stopper = asyncio.create_task(self.stop.wait())
            done, _ = await asyncio.wait([loop, *readers, stopper], return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task is not stopper and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
        finally:
            self.stop.set()
            for task in (loop, *readers):
                task.cancel()
            await asyncio.gather(loop, *readers, return_exceptions=True)
            with contextlib.suppress(Exception):
                await self.consumer.stop()
            await self.producer.stop()
            await self.plain.stop()


def main(settings: Settings) -> int:
    """``flywheel router``: run the router on uvloop until SIGINT or SIGTERM."""
    setup_logging(settings.log_level)
    # Intra-op threads only help MiniLM on an idle machine; beside workers they wait on each other
    # (docs/bench/request-plane.md measured one prompt at 35 ms on 1 thread, 408 ms on 2).
    torch.set_num_threads(settings.router_threads)
    setup_tracing("flywheel-router", settings.otlp_endpoint, sample_ratio=settings.trace_sample_ratio)
    start_metrics(settings.metrics_port, "router", settings.metrics_host)

    run_async(run_until_stopped(settings, "flywheel-router", RouterStage))
    return 0
