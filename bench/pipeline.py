"""Pipeline overhead: our produce -> consume path against raw aiokafka, side by side.

Each side runs in its own process, as a producing and a consuming service do in a deployment
(``bench/pipeline_proc.py``). ``ours``: EventProducer (Avro serde with the schema id from the
registry, W3C trace context injected into headers) -> broker -> EventConsumer
(registry-resolved batched decode, each record processed inside its trace context, with a CONSUMER
span for sampled traces). ``raw``: AIOKafkaProducer/AIOKafkaConsumer moving the very same payload
bytes, no serde, no tracing. Variants of ours: ``ours_typed`` (typed events in and out),
``ours_fastavro`` (the reference codec instead of cavro), ``ours_full_sampling`` (every trace
sampled). Rounds alternate all variants on the same broker and the medians are compared:
``ratio = ours_msgs_per_s / raw_msgs_per_s``.

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

from infra.connect import connect, replication_factor
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
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS),
                        help="variants to run besides ours, ours_full_sampling and raw (always run)")


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _side(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.pipeline_proc", *args,
        stdout=asyncio.subprocess.PIPE, env=dict(os.environ, PYTHONUNBUFFERED="1"), limit=1 << 26)


# name -> (mode, codec, typed, trace sample ratio or None for --sample-ratio)
VARIANTS: dict[str, tuple[str, str, bool, float | None]] = {
    "ours": ("ours", "cavro", False, None),
    "ours_typed": ("ours", "cavro", True, None),
    "ours_fastavro": ("ours", "fastavro", False, None),
    "ours_full_sampling": ("ours", "cavro", False, 1.0),
    "raw": ("raw", "cavro", False, None),
}


async def _one_round(mode: str, topic: str, n: int, rate: float, ratio: float, codec: str = "cavro",
                     typed: bool = False) -> dict[str, Any]:
    common = ["--mode", mode, "--topic", topic, "--messages", str(n), "--codec", codec] + (["--typed"] if typed else [])
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


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(values), 1), "mean": round(statistics.fmean(values), 1),
            "min": round(min(values), 1), "max": round(max(values), 1)}


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    settings = get_settings()
    svc = await connect(settings, "bench-pipeline", run_migrations=True, create_topics=True)
    topic = f"bench.pipeline.{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(**svc.kafka.client_kwargs())
    await admin.start()
    await ensure_topics(admin, [TopicSpec(topic, "InferenceRequest", "user_id", 3)], replication_factor(settings))
    await admin.close()
    guarantee = svc.capabilities.guarantee
    await svc.close()
    variants = [v for v in VARIANTS if v in args.variants or v in ("ours", "ours_full_sampling", "raw")]
    rates: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(args.rounds):
        for name in variants:  # alternating, so load changes hit every variant alike
            mode, codec, typed, ratio = VARIANTS[name]
            result = await _one_round(mode, topic, args.messages, 0, args.sample_ratio if ratio is None else ratio,
                                      codec, typed)
            rates[name].append(result["msgs_per_s"])
    paced = await _one_round("ours", topic, args.latency_messages, args.latency_rate, args.sample_ratio)
    paced_raw = await _one_round("raw", topic, args.latency_messages, args.latency_rate, args.sample_ratio)
    median = {name: statistics.median(values) for name, values in rates.items()}
    raw = median["raw"]
    lat, lat_raw = paced["latencies_ms"], paced_raw["latencies_ms"]
    hop = {"p50": round(_percentile(lat, 0.5), 2), "p99": round(_percentile(lat, 0.99), 2)}
    raw_hop = {"p50": round(_percentile(lat_raw, 0.5), 2), "p99": round(_percentile(lat_raw, 0.99), 2)}
    ratios = {name: round(value / raw, 3) for name, value in median.items() if name != "raw"}
    # Per-round ratios (each round's variant against the same round's raw) show the spread.
    round_ratios = {name: [round(o / r, 3) for o, r in zip(rates[name], rates["raw"], strict=True)]
                    for name in rates if name != "raw"}
    return {
        "messages": args.messages,
        "rounds": args.rounds,
        "ours_msgs_per_s": round(median["ours"], 1),
        "raw_msgs_per_s": round(raw, 1),
        "ratio": ratios["ours"],
        "ours_full_sampling_msgs_per_s": round(median["ours_full_sampling"], 1),
        "ratio_full_sampling": ratios["ours_full_sampling"],
        "ratios": ratios,
        "round_ratios": round_ratios,
        "hop_latency_ms": hop,
        "raw_hop_latency_ms": raw_hop,
        "hop_p99_over_raw_ms": round(hop["p99"] - raw_hop["p99"], 2),
        "latency_rate_msgs_per_s": args.latency_rate,
        "trace_sample_ratio": args.sample_ratio,
        "msgs_per_s": {name: _spread(values) for name, values in rates.items()},
        "rounds_msgs_per_s": {k: [round(v, 1) for v in vs] for k, vs in rates.items()},
        "targets": {"ratio": 0.6, "ratio_full_sampling": 0.5, "hop_p99_over_raw_ms": 5.0},
        "targets_met": {"ratio": ratios["ours"] >= 0.6, "ratio_full_sampling": ratios["ours_full_sampling"] >= 0.5,
                        "hop_p99_over_raw_ms": hop["p99"] - raw_hop["p99"] <= 5.0},
        "broker": guarantee,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    setup_logging("WARNING")
    with local_services(get_settings()):
        return run_async(_run(args))
