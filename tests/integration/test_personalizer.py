"""ASLS on the real broker: one user's feedback trains that user's adapter (a CoMiGS mixture or a
LoRA), the personaliser announces it, and a SmolLM2 worker serves that user's next request with
it -- and only that user's: another user's response is produced by the base model. For mixtures
the trainer then publishes a new base version: the worker hot-loads it, the personaliser
re-bases the user's mixture onto it, and the user is served by the re-based mixture on the new
base (the response names both versions)."""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from pathlib import Path
from typing import Any

import pytest
from safetensors import safe_open
from safetensors.torch import save_file

from flywheel.personalizer_admin import rollback
from infra.connect import connect
from streams import events
from streams.events import envelope, inference_request
from streams.kafka import EventProducer
from tests.integration.conftest import make_settings
from tests.integration.test_trainer_loop import events_of, process, wait_for
from tests.integration.test_worker import decision

pytestmark = [pytest.mark.integration, pytest.mark.model]

MODEL = "smollm2-135m"
PERSONALIZER_ENV = {
    "FLYWHEEL_PERSONALIZER_MIN_EVENTS": "2",
    "FLYWHEEL_PERSONALIZER_BASE_BATCH": "1.0",
    "FLYWHEEL_PERSONALIZER_MIN_BATCH": "0.5",
    "FLYWHEEL_PERSONALIZER_AGREE_OCTAVES": "0",
    "FLYWHEEL_PERSONALIZER_MAX_UPDATES_PER_HOUR": "3600",
    "FLYWHEEL_PERSONALIZER_UPDATE_BUDGET_S": "10",
}


def feedback(response: dict, kind: str, **fields: Any) -> dict:
    return events.feedback(user_id=response["user_id"], request_id=response["request_id"], kind=kind,
                           tenant_id=response["tenant_id"], model=response["model"], **fields)


def new_base(root: Path, version: str) -> Path:
    """A published checkpoint: the base's own final norm under a new version (same function)."""
    from models.loader import converted_dir

    with safe_open(str(converted_dir(MODEL) / "model.safetensors"), "pt") as f:
        norm = f.get_tensor("model.norm.weight").clone()
    d = root / f"ckpt-{uuid.uuid4().hex[:8]}"
    d.mkdir(parents=True)
    save_file({"model.norm.weight": norm}, str(d / "model.safetensors"))
    (d / "checkpoint.json").write_text(json.dumps({"base_model": MODEL, "version": version, "step": 1}))
    return d


@pytest.mark.parametrize("kind", ["comigs", "lora"])
async def test_feedback_trains_an_adapter_served_only_to_its_user(kafka_broker, postgres, kind):
    prefix = f"ps{uuid.uuid4().hex[:6]}."
    alice, bob = f"alice-{uuid.uuid4().hex[:6]}", f"bob-{uuid.uuid4().hex[:6]}"
    services = await connect(make_settings(topic_prefix=prefix), "ps-test", run_migrations=True, create_topics=True)
    producer = EventProducer(services.kafka, services.serde, services.capabilities)
    await producer.start()
    catalog = services.catalog

    async def ask(user: str, prompt: str, seed: int | None = None) -> dict:
        req = inference_request(user_id=user, prompt=prompt, max_tokens=12, seed=seed,
                                temperature=0.0 if seed is None else 1.0)
        await producer.send_and_wait(catalog.requests, req, key=user)  # the personaliser learns the prompt here
        await producer.send_and_wait(catalog.decisions(MODEL), decision(req), key=req["request_id"])

        async def answered():
            found = [e for e in await events_of(services, catalog.responses) if e["request_id"] == req["request_id"]]
            return found[0] if found else None

        return await wait_for(answered, 240, f"a response to {prompt!r}")

    try:
        with process(["worker", "--model", MODEL, "--worker-id", "ps-1"], prefix), \
                process(["personalizer"], prefix, **PERSONALIZER_ENV, FLYWHEEL_PERSONALIZER_ADAPTER_KIND=kind):
            # Two sampled answers to one prompt (a regenerate shows the user a different answer).
            first = await ask(alice, "Describe the sea in one sentence.", seed=1)
            second = await ask(alice, "Describe the sea in one sentence.", seed=2)
            assert first["text"] != second["text"]
            assert first["adapter_version"] is None and second["adapter_version"] is None
            # Alice regenerates the first answer, accepts the second and says so explicitly.
            sent = [
                feedback(first, "implicit", implicit={"signal": "regenerate", "edited_text": None, "dwell_ms": None}),
                feedback(second, "implicit", implicit={"signal": "accept", "edited_text": None, "dwell_ms": 15000}),
                feedback(second, "pairwise", pairwise={"request_id_a": first["request_id"], "model_a": MODEL,
                                                        "request_id_b": second["request_id"], "model_b": MODEL,
                                                        "winner": "b"}),
            ]
            for event in sent:
                await producer.send_and_wait(catalog.feedback, event, key=alice)

            async def announced():
                dead = await events_of(services, catalog.dlq("personalizer"))
                assert not dead, f"the personaliser dead-lettered feedback: {[d['reason'] for d in dead]}"
                found = [e for e in await events_of(services, catalog.adapters) if e["user_id"] == alice]
                return found[-1] if found else None

            adapter = await wait_for(announced, 300, "AdapterPublished for alice")
            assert adapter["base_model"] == MODEL and adapter["version"] == 1 and not adapter["rollback"]
            assert len(adapter["adapter_hash"]) == 64 and adapter["parent_hash"] is None
            files = "mixture.safetensors" if kind == "comigs" else "adapter_model.safetensors"
            assert os.path.exists(os.path.join(adapter["uri"], files))
            assert adapter["metrics"]["steps"] >= 1 and adapter["base_version"] == "base"

            async def alice_served_with_adapter():
                response = await ask(alice, "Describe a forest in one sentence.")
                return response if response["adapter_version"] == adapter["adapter_hash"] else None

            await wait_for(alice_served_with_adapter, 240, "alice's response produced with her adapter")
            other = await ask(bob, "Describe a forest in one sentence.")
            assert other["adapter_version"] is None, "bob must never be served alice's adapter"

            # A redelivered feedback event is not applied twice: its announcement is re-sent as is.
            trigger = await services.pool.fetchval("SELECT feedback_id FROM adapters WHERE user_id = $1", alice)
            await producer.send_and_wait(catalog.feedback, next(e for e in sent if e["event_id"] == trigger),
                                         key=alice)

            async def announced_twice():
                found = [e for e in await events_of(services, catalog.adapters) if e["user_id"] == alice]
                return found if len(found) >= 2 else None

            again = await wait_for(announced_twice, 60, "the re-sent announcement")
            assert {(e["event_id"], e["version"], e["adapter_hash"]) for e in again} == \
                {(adapter["event_id"], 1, adapter["adapter_hash"])}
            rows = await services.pool.fetch("SELECT version, adapter_hash, feedback_id FROM adapters "
                                             "WHERE user_id = $1", alice)
            assert [(r["version"], r["adapter_hash"]) for r in rows] == [(1, adapter["adapter_hash"])]
            assert await services.pool.fetchval("SELECT count(*) FROM personalizer_applied WHERE user_id = $1",
                                                alice) == len(sent)
            assert not await events_of(services, catalog.dlq("personalizer"))

            rolled_to = 2
            if kind == "comigs":
                # The trainer publishes a new base: workers hot-load it (alice's mixture, pinned to
                # "base", is no longer served), and the personaliser re-bases it onto v1.
                checkpoint = new_base(Path(str(make_settings().artifacts_dir)).resolve() / "test-checkpoints", "v1")
                published = {**envelope("v1", "system", "trainer"), "model": MODEL, "version": "v1",
                             "checkpoint_hash": "0" * 64, "uri": str(checkpoint), "step": 1,
                             "parent_version": "base", "metrics": {}}
                await producer.send_and_wait(catalog.models_topic, published, key=MODEL)

                async def rebased():
                    found = [e for e in await events_of(services, catalog.adapters)
                             if e["user_id"] == alice and e["base_version"] == "v1"]
                    return found[-1] if found else None

                moved = await wait_for(rebased, 300, "alice's mixture re-based onto v1")
                assert moved["version"] == 2 and moved["metrics"]["rebase"] == 1.0
                assert moved["parent_hash"] == adapter["adapter_hash"] != moved["adapter_hash"]

                async def served_on_v1():
                    response = await ask(alice, "Describe a lake in one sentence.")
                    ok = response["model_version"] == "v1" and response["adapter_version"] == moved["adapter_hash"]
                    return response if ok else None

                await wait_for(served_on_v1, 240, "alice served by her re-based mixture on base v1")
                other = await ask(bob, "Describe a lake in one sentence.")
                assert other["adapter_version"] is None and other["model_version"] == "v1"
                rolled_to = 3

            # An operator rolls alice back to the base model: a new version, and workers follow.
            event = await rollback(make_settings(topic_prefix=prefix), alice, 0)
            assert event["rollback"] and event["version"] == rolled_to and event["adapter_hash"] == ""

            async def alice_served_by_base():
                response = await ask(alice, "Describe a river in one sentence.")
                return response if response["adapter_version"] is None else None

            await wait_for(alice_served_by_base, 120, "alice served by the base model after the rollback")
    finally:
        await producer.stop()
        await services.close()
    await asyncio.sleep(0)
