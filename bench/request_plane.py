"""Request plane: gateway -> router -> worker -> gateway, with an engine that answers instantly.

    flywheel bench request-plane --json [--concurrency 1 4 16 64 256] [--requests 600]

Three real processes (``flywheel gateway``, ``flywheel router``, ``flywheel worker --engine echo``)
on the local broker and Postgres, under a fresh topic prefix; closed-loop HTTP clients post
OpenAI chat completions at each concurrency level. The echo engine answers in the iteration that
admits a request (``workers/engines/echo.py``), so what is measured is the event plane: HTTP,
validation, the router's embedding and ranking, three Kafka hops, the worker's transaction and
ledger, the gateway's response reader.

Per hop, from the broker's record timestamps (producer create time, one clock on one machine):

* ``gateway_in``: client send -> InferenceRequest appended (HTTP, validation, produce);
* ``router``: request -> RoutingDecision (consume, embed, rank, journal, produce);
* ``worker``: decision -> InferenceResponse (consume, ledger check, serve, transactional produce);
* ``gateway_out``: response -> client receipt (consume, match, HTTP answer).

``direct``: the same requests through the worker's serving loop and the echo engine in this
process, no event plane (the floor). ``added`` latency = end-to-end minus direct.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from infra.connect import connect
from infra.runtime import run_async, setup_logging
from infra.services import local_services
from infra.settings import Settings, get_settings
from streams.replay import read_topics
from workers.engines.base import SamplingParams
from workers.engines.echo import EchoEngine
from workers.serving import FinalEvent, ServeRequest, ServingLoop

MODEL = "smollm2-135m"
PROMPTS = ["What is 2+3?", "Name a fruit.", "Say hello in French.", "What color is the sky?",
           "What is the capital of Italy?", "Name a planet.", "What do bees make?", "Count to three."]
HOPS = ("gateway_in", "router", "worker", "gateway_out")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64, 256])
    parser.add_argument("--requests", type=int, default=600, help="requests per concurrency level (after warm-up)")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--sample-ratio", type=float, default=0.01, help="share of traces sampled")
    parser.add_argument("--startup-timeout-s", type=float, default=180.0)


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def _summary(values: list[float]) -> dict[str, float]:
    return {"p50": round(_pct(values, 0.5), 2), "p99": round(_pct(values, 0.99), 2),
            "mean": round(statistics.fmean(values), 2) if values else float("nan")}


def direct_ms(n: int, max_tokens: int) -> list[float]:
    """Latency of the same work without the event plane: serving loop + echo engine, in process."""
    loop = ServingLoop(EchoEngine(MODEL))
    out = []
    for i in range(n):
        started = time.perf_counter()
        loop.admit(ServeRequest(f"d{i}", PROMPTS[i % len(PROMPTS)], SamplingParams(max_tokens=max_tokens)))
        while not any(isinstance(e, FinalEvent) for e in loop.step()):
            pass
        out.append((time.perf_counter() - started) * 1000)
    return out


class Fleet:
    """The gateway, router and echo worker as child processes (as under ``flywheel up``)."""

    def __init__(self, settings: Settings, prefix: str, sample_ratio: float) -> None:
        self.url = f"http://127.0.0.1:{settings.gateway_port}"
        self.log_dir = settings.home.resolve() / "logs" / "request-plane"
        self.env = dict(os.environ, FLYWHEEL_TOPIC_PREFIX=prefix, FLYWHEEL_TRACE_SAMPLE_RATIO=str(sample_ratio),
                        FLYWHEEL_GATEWAY_MAX_INFLIGHT="100000", FLYWHEEL_GATEWAY_MAX_LAG="100000",
                        FLYWHEEL_LOG_LEVEL="WARNING", PYTHONUNBUFFERED="1")
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for name, args in (("router", ["router"]),
                           ("worker", ["worker", "--model", MODEL, "--engine", "echo", "--worker-id", "bench-echo",
                                       "--rollout-sample", "0"]),
                           ("gateway", ["gateway"])):
            log = (self.log_dir / f"{name}.log").open("ab")
            self.procs.append(subprocess.Popen([sys.executable, "-m", "flywheel.cli", *args], env=self.env,
                                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True))

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def check(self) -> None:
        dead = [p.args for p in self.procs if p.poll() is not None]
        if dead:
            raise RuntimeError(f"a fleet process exited: {dead}; see {self.log_dir}")


def _body(i: int, max_tokens: int) -> dict[str, Any]:
    return {"model": MODEL, "user": f"bench-user-{i % 64}", "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]}


async def _wait_ready(fleet: Fleet, client: httpx.AsyncClient, timeout_s: float, max_tokens: int) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        fleet.check()
        try:
            response = await client.post("/v1/chat/completions", json=_body(0, max_tokens), timeout=30)
            if response.status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"the fleet did not answer within {timeout_s:.0f}s; see {fleet.log_dir}")
        await asyncio.sleep(1.0)


async def _level(client: httpx.AsyncClient, concurrency: int, total: int, max_tokens: int
                 ) -> tuple[dict[str, Any], dict[str, tuple[float, float]]]:
    """Closed loop: ``concurrency`` clients, each posting its next request when the last returns."""
    next_index = 0
    latencies: list[float] = []
    errors: dict[str, int] = {}
    times: dict[str, tuple[float, float]] = {}  # request id -> (sent, received) epoch ms

    async def one_client() -> None:
        nonlocal next_index
        while next_index < total:
            i = next_index
            next_index += 1
            sent_wall, sent = time.time() * 1000, time.perf_counter()
            try:
                response = await client.post("/v1/chat/completions", json=_body(i, max_tokens), timeout=120)
            except httpx.HTTPError as exc:
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                continue
            received = time.perf_counter()
            if response.status_code != 200:
                errors[str(response.status_code)] = errors.get(str(response.status_code), 0) + 1
                continue
            latencies.append((received - sent) * 1000)
            times[response.json()["flywheel"]["request_id"]] = (sent_wall, time.time() * 1000)

    started = time.perf_counter()
    await asyncio.gather(*(one_client() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    return {"concurrency": concurrency, "requests": total, "answered": len(latencies), "errors": errors,
            "rps": round(len(latencies) / elapsed, 1), "latency_ms": _summary(latencies)}, times


async def _hops(settings: Settings, prefix: str, times: dict[str, tuple[float, float]]
                ) -> dict[str, dict[str, float]]:
    """Per-hop milliseconds of every answered request (request id -> hop -> ms), from record timestamps."""
    svc = await connect(settings.model_copy(update={"topic_prefix": prefix}), "bench-request-plane-reader")
    try:
        catalog = svc.catalog
        stamps: dict[str, dict[str, int]] = {}
        for name, topic in (("request", catalog.requests), ("decision", catalog.decisions(MODEL)),
                            ("response", catalog.responses)):
            for r in await read_topics(svc.kafka, [topic], timeout_s=120):
                _, event = await svc.serde.deserialize(r.value)
                rid = event["request"]["request_id"] if name == "decision" else event["request_id"]
                stamps.setdefault(rid, {})[name] = r.timestamp
    finally:
        await svc.close()
    out: dict[str, dict[str, float]] = {}
    for rid, (sent, received) in times.items():
        s = stamps.get(rid, {})
        if len(s) == 3:
            out[rid] = {"gateway_in": s["request"] - sent, "router": s["decision"] - s["request"],
                        "worker": s["response"] - s["decision"], "gateway_out": received - s["response"]}
    return out


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    settings = get_settings()
    prefix = f"benchrp{uuid.uuid4().hex[:8]}."
    svc = await connect(settings.model_copy(update={"topic_prefix": prefix}), "bench-request-plane",
                        run_migrations=True, create_topics=True)
    broker = svc.capabilities.guarantee
    await svc.close()
    direct = direct_ms(2000, args.max_tokens)
    fleet = Fleet(settings, prefix, args.sample_ratio)
    fleet.start()
    levels: list[dict[str, Any]] = []
    all_times: dict[str, tuple[float, float]] = {}
    by_level_times: list[dict[str, tuple[float, float]]] = []
    try:
        most = max(args.concurrency)
        limits = httpx.Limits(max_connections=most + 8, max_keepalive_connections=most)
        async with httpx.AsyncClient(base_url=fleet.url, limits=limits) as client:
            await _wait_ready(fleet, client, args.startup_timeout_s, args.max_tokens)
            await _level(client, 8, 200, args.max_tokens)  # warm-up: connections, JIT caches, group joins
            for concurrency in args.concurrency:
                fleet.check()
                summary, times = await _level(client, concurrency, args.requests, args.max_tokens)
                levels.append(summary)
                by_level_times.append(times)
                all_times.update(times)
    finally:
        fleet.stop()
    hops = await _hops(settings, prefix, all_times)
    direct_p50 = _pct(direct, 0.5)
    for summary, times in zip(levels, by_level_times, strict=True):
        summary["per_hop_ms"] = {h: _summary([hops[rid][h] for rid in times if rid in hops]) for h in HOPS}
        summary["added_latency_ms"] = {"p50": round(summary["latency_ms"]["p50"] - direct_p50, 2),
                                       "p99": round(summary["latency_ms"]["p99"] - direct_p50, 2)}
    best = max(levels, key=lambda s: s["rps"])
    # The headline: the highest throughput at which the median added latency is within 25 ms.
    within = [s for s in levels if s["added_latency_ms"]["p50"] <= 25.0]
    headline = max(within, key=lambda s: s["rps"]) if within else best
    return {
        "max_rps": best["rps"],
        "max_rps_concurrency": best["concurrency"],
        "max_rps_within_25ms_added_p50": headline["rps"] if within else None,
        "latency_ms": headline["latency_ms"],
        "added_latency_ms": headline["added_latency_ms"],
        "headline_concurrency": headline["concurrency"],
        "per_hop_ms": headline["per_hop_ms"],
        "direct_ms": _summary(direct),
        "by_concurrency": levels,
        "targets": {"rps": 300, "added_p50_ms": 25.0},
        "target_met": bool(within) and headline["rps"] >= 300,
        "requests_per_level": args.requests,
        "max_tokens": args.max_tokens,
        "trace_sample_ratio": args.sample_ratio,
        "broker": broker,
        "logs": str(Path("logs") / "request-plane"),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    setup_logging("WARNING")
    with local_services(get_settings()):
        return run_async(_run(args))
