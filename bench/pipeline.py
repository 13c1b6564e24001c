"""Pipeline overhead: our produce -> consume path against raw aiokafka, side by side.

Each side runs in its own process, as a producing and a consuming service do in a deployment
(``bench/pipeline_proc.py``). ``ours``: EventProducer (Avro serde with the schema id from the
registry, W3C trace context injected into headers) -> broker -> EventConsumer
(registry-resolved decode, each record processed inside its trace context, with a CONSUMER span
for sampled traces). ``raw``: AIOKafkaProducer/AIOKafkaConsumer moving the very same payload
bytes, no serde, no tracing. Rounds alternate ours/raw on the same broker and the medians are
compared: ``ratio = ours_msgs_per_s / raw_msgs_per_s``.

Throughput is measured flat out; hop latency (consume time minus the record's producer
timestamp) is measured in a separate paced phase at a rate well under capacity, because at
full speed it only measures queueing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import uuid
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient

from infra.connect import connect
from infra.runtime import run_async, setup_logging
from infra.services import local_services
from infra.settings import get_settings
from streams.topics import TopicSpec, ensure_topics


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--latency-messages", type=int, default=2_000)
    parser.add_argument("--latency-rate", type=float, default=1_000.0, help="messages/s in the latency phase")
    parser.add_argument("--sample-ratio", type=float, default=0.01,
                        help="share of traces sampled (FLYWHEEL_TRACE_SAMPLE_RATIO's production default)")


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _side(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.pipeline_proc", *args,
        stdout=asyncio.subprocess.PIPE, env=dict(os.environ, PYTHONUNBUFFERED="1"), limit=1 << 26)


async def _one_round(mode: str, topic: str, n: int, rate: float, ratio: float) -> dict[str, Any]:
    common = ["--mode", mode, "--topic", topic, "--messages", str(n)]
    consumer = await _side("consume", *common)
    assert consumer.stdout is not None
    ready = json.loads(await consumer.stdout.readline())
    assert ready.get("ready"), ready
    producer = await _side("produce", *common, "--rate", str(rate), "--sample-ratio", str(ratio))
    out, _ = await producer.communicate()
    produced = json.loads(out.decode().strip().splitlines()[-1])
    consumed = json.loads(await consumer.stdout.readline())
    await consumer.wait()
    elapsed_s = (consumed["last_ms"] - produced["first_ms"]) / 1000
    return {"msgs_per_s": n / elapsed_s, "latencies_ms": consumed["latencies_ms"]}


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    settings = get_settings()
    svc = await connect(settings, "bench-pipeline", run_migrations=True, create_topics=True)
    topic = f"bench.pipeline.{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(**svc.kafka.client_kwargs())
    await admin.start()
    await ensure_topics(admin, [TopicSpec(topic, "InferenceRequest", "user_id", 3)])
    await admin.close()
    guarantee = svc.capabilities.guarantee
    await svc.close()
    rates: dict[str, list[float]] = {"ours": [], "raw": [], "ours_full_sampling": []}
    for _ in range(args.rounds):
        for mode in ("ours", "raw"):
            rates[mode].append((await _one_round(mode, topic, args.messages, 0, args.sample_ratio))["msgs_per_s"])
        full = await _one_round("ours", topic, args.messages, 0, 1.0)
        rates["ours_full_sampling"].append(full["msgs_per_s"])
    paced = await _one_round("ours", topic, args.latency_messages, args.latency_rate, args.sample_ratio)
    paced_raw = await _one_round("raw", topic, args.latency_messages, args.latency_rate, args.sample_ratio)
    ours, raw = statistics.median(rates["ours"]), statistics.median(rates["raw"])
    full_rate = statistics.median(rates["ours_full_sampling"])
    lat, lat_raw = paced["latencies_ms"], paced_raw["latencies_ms"]
    return {
        "messages": args.messages,
        "rounds": args.rounds,
        "ours_msgs_per_s": round(ours, 1),
        "raw_msgs_per_s": round(raw, 1),
        "ratio": round(ours / raw, 3),
        "hop_latency_ms": {"p50": round(_percentile(lat, 0.5), 2), "p99": round(_percentile(lat, 0.99), 2)},
        "raw_hop_latency_ms": {"p50": round(_percentile(lat_raw, 0.5), 2),
                               "p99": round(_percentile(lat_raw, 0.99), 2)},
        "latency_rate_msgs_per_s": args.latency_rate,
        "trace_sample_ratio": args.sample_ratio,
        "ours_full_sampling_msgs_per_s": round(full_rate, 1),
        "ratio_full_sampling": round(full_rate / raw, 3),
        "rounds_msgs_per_s": {k: [round(v, 1) for v in vs] for k, vs in rates.items()},
        "broker": guarantee,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    setup_logging("WARNING")
    with local_services(get_settings()):
        return run_async(_run(args))
