"""Feedback to live adapter, through the real broker, personaliser and worker.

For each of ``users`` fresh users, one after the other: two sampled SmolLM2 answers to one prompt;
the user regenerates the first, accepts the second and prefers it explicitly (three Feedback
events). The clock starts when the last of them is acknowledged by the broker and stops when the
first response produced *with the user's new adapter* arrives on the responses topic (the
personaliser trained, stored and announced the adapter; the worker hot-loaded it and served a
request with it). ``published_s`` stops at the AdapterPublished event instead.

The personaliser runs with thresholds that make the third event trigger an update (minimum 2
events, base batch 1, agreement not postponing it): this measures the path from feedback to a
live adapter, not how long the ASLS rule waits for evidence (which is the offline benchmark's
subject). The update's wall-time bound is the production default, 20 s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

from infra.connect import Services, connect
from infra.services import local_services
from infra.settings import Settings, get_settings
from streams import events
from streams.events import envelope, inference_request
from streams.kafka import EventProducer
from streams.replay import read_topics

MODEL = "smollm2-135m"
EAGER = {
    "FLYWHEEL_PERSONALIZER_MIN_EVENTS": "2",
    "FLYWHEEL_PERSONALIZER_BASE_BATCH": "1.0",
    "FLYWHEEL_PERSONALIZER_MIN_BATCH": "0.5",
    "FLYWHEEL_PERSONALIZER_AGREE_OCTAVES": "0",
    "FLYWHEEL_PERSONALIZER_MAX_UPDATES_PER_HOUR": "3600",
}
PROMPTS = ("Describe the sea in one sentence.", "What makes a good breakfast?", "Explain rain to a child.",
           "Name three uses of a brick.", "Why do cats purr?", "How do plants drink water?")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--users", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per user before giving up")


@contextlib.contextmanager
def _process(args: list[str], env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen([sys.executable, "-m", "flywheel.cli", *args], start_new_session=True,
                            env={**os.environ, **env}, stdout=subprocess.DEVNULL)
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)


class _Session:
    def __init__(self, services: Services, producer: EventProducer, timeout_s: float) -> None:
        self.s, self.producer, self.timeout_s = services, producer, timeout_s

    async def _events(self, topic: str) -> list[dict[str, Any]]:
        return [(await self.s.serde.deserialize(r.value))[1] for r in await read_topics(self.s.kafka, [topic])]

    async def _wait(self, predicate: Any, what: str) -> Any:
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            found = await predicate()
            if found:
                return found
            await asyncio.sleep(0.25)
        raise TimeoutError(f"timed out waiting for {what}")

    async def ask(self, user: str, prompt: str, seed: int | None = None) -> dict[str, Any]:
        req = inference_request(user_id=user, prompt=prompt, max_tokens=12, seed=seed,
                                temperature=0.0 if seed is None else 1.0)
        decision = {**envelope(req["request_id"], req["tenant_id"], user), "request": req, "model": MODEL,
                    "candidates": [], "fallbacks": [], "router_name": "bench", "router_version": "0",
                    "reason": "bench", "feedback_offset": -1}
        await self.producer.send_and_wait(self.s.catalog.requests, req, key=user)
        await self.producer.send_and_wait(self.s.catalog.decisions(MODEL), decision, key=req["request_id"])

        async def answered() -> dict[str, Any] | None:
            found = [e for e in await self._events(self.s.catalog.responses) if e["request_id"] == req["request_id"]]
            return found[0] if found else None

        result: dict[str, Any] = await self._wait(answered, f"a response for {user}")
        return result

    async def one_user(self, user: str, prompt: str) -> dict[str, float]:
        first = await self.ask(user, prompt, seed=1)
        second = await self.ask(user, prompt, seed=2)
        for seed in range(3, 8):  # a regenerate must show a different answer
            if second["text"] != first["text"]:
                break
            second = await self.ask(user, prompt, seed=seed)

        def feedback(response: dict[str, Any], kind: str, **fields: Any) -> dict[str, Any]:
            return events.feedback(user_id=user, request_id=response["request_id"], kind=kind,
                                   tenant_id=response["tenant_id"], model=MODEL, **fields)

        sent = [
            feedback(first, "implicit", implicit={"signal": "regenerate", "edited_text": None, "dwell_ms": None}),
            feedback(second, "implicit", implicit={"signal": "accept", "edited_text": None, "dwell_ms": 15000}),
            feedback(second, "pairwise", pairwise={"request_id_a": first["request_id"], "model_a": MODEL,
                                                    "request_id_b": second["request_id"], "model_b": MODEL,
                                                    "winner": "b"}),
        ]
        for event in sent:
            await self.producer.send_and_wait(self.s.catalog.feedback, event, key=user)
        started = time.monotonic()

        async def announced() -> dict[str, Any] | None:
            found = [e for e in await self._events(self.s.catalog.adapters) if e["user_id"] == user]
            return found[-1] if found else None

        adapter = await self._wait(announced, f"AdapterPublished for {user}")
        published = time.monotonic() - started
        for i in range(100):
            response = await self.ask(user, f"{PROMPTS[(i + 1) % len(PROMPTS)]} ({i})")
            if response["adapter_version"] == adapter["adapter_hash"]:
                return {"live_s": time.monotonic() - started, "published_s": published,
                        "update_s": float(adapter["metrics"].get("seconds", float("nan")))}
        raise TimeoutError(f"{user}'s adapter was announced but never served")


def _quantiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"p50": statistics.median(ordered), "p95": ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]}


async def measure(users: int, timeout_s: float = 300.0) -> dict[str, Any]:
    """``feedback_to_live_s`` (p50, p95) and its parts over ``users`` users."""
    prefix = f"pl{uuid.uuid4().hex[:6]}."
    settings = get_settings().model_copy(update={"topic_prefix": prefix})
    with local_services(settings):  # leaves the machine as found
        runs = await _measure_users(settings, prefix, users, timeout_s)
    live = [r["live_s"] for r in runs]
    return {**_quantiles(live), "published_s": _quantiles([r["published_s"] for r in runs]),
            "update_s": _quantiles([r["update_s"] for r in runs]), "users": len(runs),
            "runs": [{k: round(v, 3) for k, v in r.items()} for r in runs]}


async def _measure_users(settings: Settings, prefix: str, users: int, timeout_s: float) -> list[dict[str, float]]:
    services = await connect(settings, "bench-personalization-live", run_migrations=True, create_topics=True)
    producer = EventProducer(services.kafka, services.serde, services.capabilities)
    await producer.start()
    env = {"FLYWHEEL_TOPIC_PREFIX": prefix, "FLYWHEEL_LOG_LEVEL": "WARNING", **EAGER}
    runs: list[dict[str, float]] = []
    try:
        with _process(["worker", "--model", MODEL, "--worker-id", f"{prefix}w"], env), \
                _process(["personalizer"], env):
            session = _Session(services, producer, timeout_s)
            await session.ask(f"warmup-{prefix}", PROMPTS[0])  # both processes have loaded the model
            for i in range(users):
                runs.append(await session.one_user(f"live-{prefix}{i}", PROMPTS[i % len(PROMPTS)]))
    finally:
        await producer.stop()
        await services.close()
    return runs


def run(args: argparse.Namespace) -> dict[str, Any]:
    return asyncio.run(measure(args.users, args.timeout))
