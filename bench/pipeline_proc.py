"""One side of the pipeline benchmark, run as its own process (like a real producer or consumer).

    python -m bench.pipeline_proc produce|consume --mode ours|raw --topic T --messages N [--rate R]
        [--codec cavro|fastavro] [--typed]

Prints one JSON line. ``consume`` prints ``{"ready": true}`` once it is positioned at the end of
the topic, then ``{"first_ms", "last_ms", "count", "latencies_ms": [...]}`` when it has seen N
records. ``produce`` prints ``{"first_ms", "last_ms"}``.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from opentelemetry import trace
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from infra.connect import connect
from infra.runtime import run_async, setup_logging
from infra.settings import get_settings
from streams.contracts import InferenceRequest
from streams.events import inference_request
from streams.kafka import EventConsumer, EventProducer
from streams.schemas import contract
from streams.serde import AvroSerde
from streams.tracing import inject_headers, process_context, setup_tracing


class DiscardingExporter(SpanExporter):
    """Spans are built and batched as in production, then dropped (no collector here)."""

    def export(self, spans: Sequence[Any]) -> SpanExportResult:
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None


DATA_DIR = Path(__file__).resolve().parent.parent / "data" / "routellm"


def real_prompts() -> list[str]:
    """GSM8K questions from the RouteLLM data: the requests this system actually carries."""
    with (DATA_DIR / "gsm8k" / "gsm8k_responses.csv").open(newline="") as fh:
        return [row["prompt"] for row in csv.DictReader(fh)]


def payloads(n: int) -> list[dict[str, Any]]:
    """InferenceRequests as the gateway publishes them: a system message and a real question."""
    prompts = real_prompts()
    return [inference_request(
        user_id=f"user-{i % 97}", max_tokens=256, slo_class="interactive", willingness_to_pay=1.0,
        messages=[{"role": "system", "content": "You are a helpful assistant. Answer step by step."},
                  {"role": "user", "content": prompts[i % len(prompts)]}])
        for i in range(n)]


def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def produce(mode: str, topic: str, n: int, rate: float, sample_ratio: float, codec: str, typed: bool) -> None:
    settings = get_settings()
    svc = await connect(settings, f"bench-{mode}-producer")
    svc.serde = AvroSerde(svc.registry, codec="fastavro" if codec == "fastavro" else "cavro")
    await svc.serde.bind(topic, contract("InferenceRequest"))
    records = payloads(n)
    # Typed: the producer holds events, as a converted handler would (built before the clock starts).
    events: list[Any] = [msgspec.convert(r, InferenceRequest) for r in records] if typed else records
    interval = 1.0 / rate if rate > 0 else 0.0
    if mode == "raw":
        encoded = [(r["user_id"].encode(), svc.serde.serialize(topic, r)) for r in records]
        raw = AIOKafkaProducer(**svc.kafka.client_kwargs(), acks="all", linger_ms=5, max_batch_size=1 << 20,
                               enable_idempotence=svc.capabilities.idempotence)
        await raw.start()
        first = time.time() * 1000
        futures = []
        for i, (key, value) in enumerate(encoded):
            futures.append(await raw.send(topic, value, key=key))
            if interval:
                await asyncio.sleep(max(0.0, first / 1000 + (i + 1) * interval - time.time()))
        await asyncio.gather(*futures)
        await raw.stop()
    else:
        producer = EventProducer(svc.kafka, svc.serde, svc.capabilities, linger_ms=5)
        await producer.start()
        first = time.time() * 1000
        futures = []
        rng = random.Random(7)
        # A stage produces the outputs of each consumed batch together (send_many) inside the
        # batch's trace context; paced runs send one record at a time, each in its own trace.
        # Whether a trace is sampled was decided at its root, with probability ``sample_ratio``.
        chunk = 1 if interval else 200
        for start in range(0, len(records), chunk):
            upstream = SpanContext(rng.getrandbits(128) | 1, rng.getrandbits(64) | 1, is_remote=True,
                                   trace_flags=TraceFlags(TraceFlags.SAMPLED if rng.random() < sample_ratio
                                                          else TraceFlags.DEFAULT))
            ctx = trace.set_span_in_context(NonRecordingSpan(upstream))
            items = [(r["user_id"], e, inject_headers(ctx=ctx))
                     for r, e in zip(records[start:start + chunk], events[start:start + chunk], strict=True)]
            futures += await producer.send_many(topic, items)
            if interval:
                await asyncio.sleep(max(0.0, first / 1000 + (start + 1) * interval - time.time()))
        await asyncio.gather(*futures)
        await producer.stop()
    emit({"first_ms": first, "last_ms": time.time() * 1000})
    await svc.close()


async def consume(mode: str, topic: str, n: int, codec: str, typed: bool) -> None:
    settings = get_settings()
    svc = await connect(settings, f"bench-{mode}-consumer")
    svc.serde = AvroSerde(svc.registry, codec="fastavro" if codec == "fastavro" else "cavro")
    await svc.serde.bind(topic, contract("InferenceRequest"))
    latencies: list[float] = []
    first = last = 0.0
    if mode == "raw":
        raw = AIOKafkaConsumer(topic, **svc.kafka.client_kwargs(), group_id=None, auto_offset_reset="latest")
        await raw.start()
        await raw.seek_to_end()
        await asyncio.gather(*(raw.position(tp) for tp in raw.assignment()))
        emit({"ready": True})
        while len(latencies) < n:
            for records in (await raw.getmany(timeout_ms=100, max_records=2000)).values():
                now = time.time() * 1000
                first = first or now
                latencies.extend(now - r.timestamp for r in records)
        last = time.time() * 1000
        await raw.stop()
    else:
        consumer = EventConsumer(svc.kafka, svc.serde, [topic], group_id=None, auto_offset_reset="latest",
                                 typed=typed)
        await consumer.start()
        await consumer.raw.seek_to_end()
        await asyncio.gather(*(consumer.raw.position(tp) for tp in consumer.raw.assignment()))
        emit({"ready": True})
        batches = consumer.batches(timeout_ms=100, max_records=2000)
        while len(latencies) < n:
            batch = await anext(batches)
            now = time.time() * 1000
            for item in batch:
                r = item.record
                with process_context(r.topic, item.headers, r.partition, r.offset):
                    if item.error is not None:
                        raise RuntimeError(f"undecodable record: {item.error}")
                first = first or now
                latencies.append(now - r.timestamp)
        last = time.time() * 1000
        await consumer.stop()
    emit({"first_ms": first, "last_ms": last, "count": len(latencies), "latencies_ms": latencies})
    await svc.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("side", choices=["produce", "consume"])
    parser.add_argument("--mode", choices=["ours", "raw"], required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--messages", type=int, required=True)
    parser.add_argument("--rate", type=float, default=0.0, help="messages per second; 0 = as fast as possible")
    parser.add_argument("--sample-ratio", type=float, default=1.0)
    parser.add_argument("--codec", choices=["cavro", "fastavro"], default="cavro")
    parser.add_argument("--typed", action="store_true", help="typed events instead of dicts")
    args = parser.parse_args()
    setup_logging("WARNING")
    if args.mode == "ours":
        provider = setup_tracing(f"bench-{args.side}", sample_ratio=args.sample_ratio)
        provider.add_span_processor(BatchSpanProcessor(DiscardingExporter()))
    if args.side == "produce":
        run_async(produce(args.mode, args.topic, args.messages, args.rate, args.sample_ratio, args.codec, args.typed))
    else:
        run_async(consume(args.mode, args.topic, args.messages, args.codec, args.typed))


if __name__ == "__main__":
    main()
