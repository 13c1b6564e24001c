"""Every feedback path reaches every learner it concerns, tried as a user would: the official openai
client against the gateway (no API keys, the user named in the body), then ``POST /v1/feedback``
with the id the client shows (``chatcmpl-...``) or the bare id, for each kind of feedback.

Over the real system (router, a SmolLM2 and a Gemma-3 worker, personaliser, rewarder, gateway):
the gateway fills in the model and versions that answered; the router's ratings move the way each
piece of feedback says; the personaliser applies it; the rewarder turns it into rewards and reward
model examples; the dashboard counts it per learner. Feedback that still cannot be used (about a
request nobody answered, sent from Python) lands in the router's and personaliser's dead-letter
topics with the reason, and the dashboard counts it there.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import httpx
import pytest
from openai import AsyncOpenAI

from flywheel.client import FlywheelClient
from flywheel.supervisor import ChildSpec, Supervisor
from infra.connect import connect
from streams.replay import read_topics
from tests.conftest import TEST_HOME, flywheel_env
from tests.integration.conftest import make_settings

pytestmark = [pytest.mark.integration, pytest.mark.model]
PORT = 18283
SMOL, GEMMA = "smollm2-135m", "gemma3-270m"


@pytest.fixture(scope="module")
async def system(kafka_broker, postgres):
    prefix = f"fp{uuid.uuid4().hex[:6]}."
    services = await connect(make_settings(topic_prefix=prefix), "feedback-test", run_migrations=True,
                             create_topics=True)
    env = flywheel_env(FLYWHEEL_TOPIC_PREFIX=prefix, FLYWHEEL_LOG_LEVEL="WARNING")
    sup = Supervisor([ChildSpec("router", ("router",)), ChildSpec("personalizer", ("personalizer",)),
                      ChildSpec("rewarder", ("rewarder",)),
                      ChildSpec("worker-smol", ("worker", "--model", SMOL, "--worker-id", "fp-smol")),
                      ChildSpec("worker-gemma", ("worker", "--model", GEMMA, "--worker-id", "fp-gemma")),
                      ChildSpec("gateway", ("gateway", "--port", str(PORT)))], TEST_HOME / "logs" / prefix, env)
    sup.start_all()
    base = f"http://127.0.0.1:{PORT}"
    try:
        async with httpx.AsyncClient(base_url=base, timeout=60) as http:
            async def up() -> bool:
                try:
                    models = (await http.get("/v1/models")).json()["data"]
                except httpx.HTTPError:
                    return False
                return {m["id"] for m in models if m.get("live")} >= {SMOL, GEMMA}

            await wait_until(up, 600, "the gateway and both workers")
            yield {"base": base, "http": http, "services": services, "prefix": prefix}
    finally:
        sup.stop_all()
        await services.close()


async def wait_until(predicate, timeout_s: float, what: str) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        result = await predicate()
        if result:
            return result
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(1)


async def decoded(services, topic: str) -> list[dict[str, Any]]:
    return [(await services.serde.deserialize(r.value))[1] for r in await read_topics(services.kafka, [topic])]


async def ratings_after(system, feedback_offset: int, user: str) -> dict[str, float]:
    """Global ratings from the decision of a request routed after the router applied the feedback
    at ``feedback_offset`` (a decision records the last feedback offset applied)."""
    openai = AsyncOpenAI(base_url=f"{system['base']}/v1", api_key="unused", timeout=300, max_retries=0)
    catalog = system["services"].catalog

    async def probe() -> dict[str, float] | None:
        reply = await openai.chat.completions.create(model="auto", max_tokens=1, user=user,
                                                     messages=[{"role": "user", "content": "Say ok."}])
        rid = reply.id.removeprefix("chatcmpl-")
        for model in (SMOL, GEMMA):
            for decision in await decoded(system["services"], catalog.decisions(model)):
                if decision["request"]["request_id"] == rid and decision["feedback_offset"] >= feedback_offset:
                    return {c["model"]: c["global_rating"] for c in decision["candidates"]}
        return None

    return await wait_until(probe, 180, f"a decision made after feedback offset {feedback_offset}")


async def post_feedback(system, body: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """POST /v1/feedback; returns the reply and the feedback's offset on the topic."""
    reply = await system["http"].post("/v1/feedback", json=body)
    assert reply.status_code == 200, reply.text
    out = reply.json()
    records = await read_topics(system["services"].kafka, [system["services"].catalog.feedback])
    for r in records:
        if (await system["services"].serde.deserialize(r.value))[1]["event_id"] == out["feedback_id"]:
            return out, r.offset
    raise AssertionError(f"feedback {out['feedback_id']} is not on the topic")


async def test_each_feedback_kind_over_http_reaches_router_personaliser_and_rewarder(system):
    user = f"alice-{uuid.uuid4().hex[:6]}"
    openai = AsyncOpenAI(base_url=f"{system['base']}/v1", api_key="unused", timeout=300, max_retries=0)

    async def ask(model: str, question: str) -> Any:
        return await openai.chat.completions.create(model=model, max_tokens=8, user=user,
                                                    messages=[{"role": "user", "content": question}])

    smol, smol_2, gemma, gemma_2 = [await ask(m, q) for m, q in (
        (SMOL, "What is 2+3?"), (SMOL, "Name a colour."), (GEMMA, "What is the capital of France?"),
        (GEMMA, "Name a fruit."))]
    assert smol.id.startswith("chatcmpl-") and smol.model == SMOL and gemma.model == GEMMA
    before = await ratings_after(system, -1, user)
    applied: list[str] = []

    # thumbs, by the id the OpenAI client shows: the gateway names the model that answered
    out, offset = await post_feedback(system, {"request_id": gemma.id, "kind": "thumbs", "thumbs_up": True,
                                               "user": user})
    assert out["model"] == GEMMA and out["model_version"] and out["request_id"] == gemma.id.removeprefix("chatcmpl-")
    applied.append(out["feedback_id"])
    after = await ratings_after(system, offset, user)
    # The live router rates each model by its own success rate (local quality), so a thumbs-up for
    # one model leaves the other's rating where it was (Eagle's zero-sum ELO would lower it).
    assert after[GEMMA] > before[GEMMA] and after[SMOL] <= before[SMOL]

    # a low rating, by the bare id
    out, offset = await post_feedback(system, {"request_id": smol.id.removeprefix("chatcmpl-"), "kind": "rating",
                                               "rating": 0.1, "user": user})
    assert out["model"] == SMOL
    applied.append(out["feedback_id"])
    before, after = after, await ratings_after(system, offset, user)
    assert after[SMOL] < before[SMOL]

    # pairwise: the user names only the two answers and the winner; the gateway fills both models
    out, offset = await post_feedback(system, {"kind": "pairwise", "user": user, "pairwise": {
        "request_id_a": smol_2.id, "request_id_b": gemma_2.id, "winner": "a"}})
    applied.append(out["feedback_id"])
    before, after = after, await ratings_after(system, offset, user)
    assert after[SMOL] > before[SMOL] and after[GEMMA] < before[GEMMA]

    # implicit: the user asked for another answer
    out, offset = await post_feedback(system, {"request_id": gemma_2.id, "kind": "implicit", "user": user,
                                               "implicit": {"signal": "regenerate"}})
    assert out["model"] == GEMMA
    applied.append(out["feedback_id"])
    before, after = after, await ratings_after(system, offset, user)
    assert after[GEMMA] < before[GEMMA]

    services = system["services"]
    published = {e["event_id"]: e for e in await decoded(services, services.catalog.feedback)}
    assert all(published[f]["model"] in (SMOL, GEMMA) for f in applied if published[f]["kind"] != "pairwise")
    assert {published[applied[2]]["pairwise"]["model_a"], published[applied[2]]["pairwise"]["model_b"]} == {SMOL,
                                                                                                           GEMMA}

    async def rewarded() -> bool:  # the rewarder turned every one into rewards and model examples
        feedback_ids = {e["feedback_id"] for e in await decoded(services, services.catalog.rewards)}
        examples = await services.pool.fetchval(
            "SELECT count(*) FROM reward_examples WHERE deployment = $1 AND feedback_id = ANY($2::text[])",
            system["prefix"], applied)
        return set(applied) <= feedback_ids and examples == len(applied)

    await wait_until(rewarded, 180, "rewards for every feedback event")

    async def personalised() -> bool:  # the personaliser folded each into alice's profile
        n = await services.pool.fetchval("SELECT count(*) FROM personalizer_applied WHERE feedback_id = ANY($1)",
                                         applied)
        return n == len(applied)

    await wait_until(personalised, 300, "the personaliser to apply every feedback event")

    async def counted() -> dict[str, Any] | None:  # and the dashboard shows it, per learner
        stats = (await system["http"].get("/api/stats")).json()
        learners = stats["learners"]
        done = all(learners.get(n, {}).get("applied", 0) >= len(applied) and learners[n]["waiting"] == 0
                   for n in ("router", "personalizer", "rewarder"))
        folded = (stats["reward_model"] or {}).get("examples", 0) >= len(applied)  # the reward model learnt them
        return stats if done and folded else None

    stats = await wait_until(counted, 180, "the dashboard to count the feedback per learner")
    assert stats["feedback"] >= len(applied) and stats["feedback_by_kind"]["pairwise"] >= 1
    assert any(p["rated"] for p in stats["learning"]["reward"])


async def test_feedback_nobody_can_use_is_dead_lettered_with_its_reason_and_counted(system):
    services = system["services"]
    client = FlywheelClient(services)
    await client.start()
    try:
        record = await client.feedback(user_id="bob", request_id=f"chatcmpl-{uuid.uuid4().hex}", kind="thumbs",
                                       thumbs_up=False)
    finally:
        await client.close()
    assert record["model"] is None and not record["request_id"].startswith("chatcmpl-")

    async def dead_lettered() -> dict[str, str] | None:
        reasons = {}
        for stage in ("router", "personalizer"):
            for letter in await decoded(services, services.catalog.dlq(stage)):
                if letter["correlation_id"] == record["request_id"]:
                    reasons[stage] = letter["reason"]
        return reasons if len(reasons) == 2 else None

    reasons = await wait_until(dead_lettered, 180, "dead letters from the router and the personaliser")
    assert "cannot be placed" in reasons["router"] or "does not name the model" in reasons["router"]
    assert "never seen" in reasons["personalizer"]

    async def counted() -> dict[str, Any] | None:
        stats = (await system["http"].get("/api/stats")).json()
        ok = (stats["dead_letters"].get("router", 0) >= 1 and stats["dead_letters"].get("personalizer", 0) >= 1
              and stats["learners"]["router"]["dead_letters"] >= 1)
        return stats if ok else None

    stats = await wait_until(counted, 60, "the dashboard to count the dead letters")
    assert any(d["stage"] == "router" for d in stats["recent_dead_letters"])


async def test_http_feedback_errors_are_clear(system):
    http = system["http"]
    unknown = await http.post("/v1/feedback", json={"request_id": "chatcmpl-nope", "kind": "thumbs",
                                                    "thumbs_up": True})
    assert unknown.status_code == 404 and "unknown request nope" in unknown.json()["error"]["message"]
    pair = await http.post("/v1/feedback", json={"kind": "pairwise", "pairwise": {"request_id_a": "x"}})
    assert pair.status_code == 400 and "request_id_b" in pair.json()["error"]["message"]
    bare = await http.post("/v1/feedback", json={"kind": "thumbs", "thumbs_up": True})
    assert bare.status_code == 400 and "request_id" in bare.json()["error"]["message"]
