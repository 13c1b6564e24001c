"""FlywheelClient against the real broker, with a stand-in responder stage written in the test.

The responder answers each request with chunks and a final response carrying the request's user
id; one extra final carries a *different* user id for the same request id, which the client must
ignore (a user never receives another user's response).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid

import pytest

from flywheel.client import FlywheelClient, ResponseTimeout
from streams.events import envelope
from streams.kafka import EventConsumer, EventProducer
from streams.tracing import trace_id_of

pytestmark = pytest.mark.integration


def _final(request, text, user=None):
    return {**envelope(request["request_id"], request["tenant_id"], user or request["user_id"]),
            "request_id": request["request_id"], "model": "echo", "model_version": "v0", "adapter_version": None,
            "text": text, "prompt_tokens": 1, "completion_tokens": len(text.split()), "queue_ms": 0.0,
            "first_token_ms": 0.0, "total_ms": 1.0, "finish_reason": "stop", "worker_id": "echo",
            "cost_usd": 0.0, "error": None}


@contextlib.asynccontextmanager
async def echo_responder(services, group: str, seen_traces: list):
    consumer = EventConsumer(services.kafka, services.serde, [services.catalog.requests], group_id=group)
    producer = EventProducer(services.kafka, services.serde, services.capabilities)
    await consumer.start()
    await producer.start()

    async def loop():
        async for batch in consumer.batches(timeout_ms=100):
            for item in batch:
                request = item.event
                if request is None:
                    continue  # other tests' deliberately bad records
                seen_traces.append((request["request_id"], trace_id_of(item.headers)))
                words = ("echo: " + (request["prompt"] or "")).split(" ")
                # an impostor's final for the same request id, sent first
                await producer.send_and_wait(services.catalog.responses, _final(request, "stolen", "mallory"),
                                             key=request["request_id"])
                for i, word in enumerate(words):
                    chunk = {**envelope(request["request_id"], request["tenant_id"], request["user_id"]),
                             "request_id": request["request_id"], "index": i,
                             "delta": word if i == 0 else " " + word, "model": "echo"}
                    await producer.send_and_wait(services.catalog.chunks, chunk, key=request["request_id"])
                await producer.send_and_wait(services.catalog.responses, _final(request, " ".join(words)),
                                             key=request["request_id"])
            if batch:
                await consumer.commit()

    task = asyncio.create_task(loop())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await consumer.stop()
        await producer.stop()


async def test_submit_stream_and_feedback(services, run_prefix):
    traces: list = []
    client = FlywheelClient(services)
    await client.start()
    try:
        async with echo_responder(services, f"{run_prefix}echo", traces):
            response = await client.submit(user_id="alice", prompt="hello there", timeout_s=30)
            assert response["text"] == "echo: hello there"
            assert response["user_id"] == "alice"
            deltas = [d async for d in client.stream(user_id="alice", prompt="one two three", timeout_s=30)]
            assert "".join(deltas) == "echo: one two three"
            record = await client.feedback(user_id="alice", request_id=response["request_id"], kind="thumbs",
                                           thumbs_up=True)
            assert record["kind"] == "thumbs"
        # the client's request carried its trace context to the responder
        span_context = client.trace_of(response["request_id"])
        assert span_context is not None
        expected = format(span_context.trace_id, "032x")
        assert (response["request_id"], expected) in traces
    finally:
        await client.close()


async def test_submit_times_out_with_a_typed_error(services):
    client = FlywheelClient(services)
    await client.start()
    try:
        with pytest.raises(ResponseTimeout):
            await client.submit(user_id="bob", prompt="nobody answers", timeout_s=1.0)
    finally:
        await client.close()


async def test_feedback_names_what_was_served_from_memory_or_the_ledger(services, run_prefix):
    client = FlywheelClient(services)
    await client.start()
    try:
        async with echo_responder(services, f"{run_prefix}echo-fb", []):
            first = await client.submit(user_id="carol", prompt="first", timeout_s=30)
            second = await client.submit(user_id="carol", prompt="second", timeout_s=30)
        # the id the OpenAI API shows works, and the client names the model and versions it delivered
        record = await client.feedback(user_id="carol", request_id=f"chatcmpl-{first['request_id']}",
                                       kind="thumbs", thumbs_up=True)
        assert record["request_id"] == first["request_id"]
        assert (record["model"], record["model_version"], record["adapter_version"]) == ("echo", "v0", None)
        pair = await client.feedback(user_id="carol", request_id=first["request_id"], kind="pairwise", pairwise={
            "request_id_a": f"chatcmpl-{first['request_id']}", "request_id_b": second["request_id"],
            "model_a": "claimed", "winner": "b"})
        assert pair["pairwise"]["request_id_a"] == first["request_id"]
        assert (pair["pairwise"]["model_a"], pair["pairwise"]["model_b"]) == ("echo", "echo")  # served facts win
    finally:
        await client.close()

    # An older response, answered before this client started: the workers' ledger names it.
    old = uuid.uuid4().hex
    await services.pool.execute(
        "INSERT INTO final_responses (request_id, user_id, model, worker_id, response) VALUES ($1, $2, $3, $4, $5)",
        old, "carol", "gemma3-270m", "w-1", {"request_id": old, "model": "gemma3-270m", "model_version": "v7",
                                             "adapter_version": "3:abc", "text": "Paris"})
    fresh = FlywheelClient(services)
    await fresh.start()
    try:
        record = await fresh.feedback(user_id="carol", request_id=old, kind="rating", rating=0.9, model="smollm2-135m")
        assert (record["model"], record["model_version"], record["adapter_version"]) == ("gemma3-270m", "v7", "3:abc")
        unknown = await fresh.feedback(user_id="carol", request_id="never-answered", kind="thumbs", thumbs_up=True)
        assert unknown["model"] is None  # published as given: the learners dead-letter it with the reason
    finally:
        await fresh.close()
