"""The gateway over the real system (router, SmolLM2 worker, gateway processes): the official
openai client, streaming and not; API keys and per-user isolation; clear 4xx errors; and the
dashboard rendering live data in headless Chromium."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import time
import uuid

import httpx
import pytest
from openai import AsyncOpenAI, AuthenticationError, BadRequestError, NotFoundError, PermissionDeniedError

from flywheel.supervisor import ChildSpec, Supervisor
from infra.connect import connect
from tests.conftest import TEST_HOME, flywheel_env
from tests.integration.conftest import make_settings

pytestmark = [pytest.mark.integration, pytest.mark.model]
PORT = 18282
KEYS = {"sk-alice": "alice", "sk-bob": "bob"}


@pytest.fixture(scope="module")
async def system(kafka_broker, postgres):
    prefix = f"gw{uuid.uuid4().hex[:6]}."
    services = await connect(make_settings(topic_prefix=prefix), "gateway-test", run_migrations=True,
                             create_topics=True)
    await services.close()
    env = flywheel_env(FLYWHEEL_TOPIC_PREFIX=prefix, FLYWHEEL_LOG_LEVEL="WARNING",
                       FLYWHEEL_GATEWAY_API_KEYS=json.dumps(KEYS))
    sup = Supervisor([ChildSpec("router", ("router",)),
                      ChildSpec("worker", ("worker", "--model", "smollm2-135m", "--worker-id", "gw-1")),
                      ChildSpec("gateway", ("gateway", "--port", str(PORT)))], TEST_HOME / "logs" / prefix, env)
    sup.start_all()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{PORT}") as http:
            deadline = time.monotonic() + 240
            while True:
                try:
                    if (await http.get("/healthz")).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, "gateway did not come up"
                await asyncio.sleep(1)
        yield f"http://127.0.0.1:{PORT}"
    finally:
        sup.stop_all()


def client(base: str, key: str) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=f"{base}/v1", api_key=key, timeout=300, max_retries=0)


async def test_openai_client_non_streaming_and_streaming(system):
    alice = client(system, "sk-alice")
    models = await alice.models.list()
    assert {"auto", "smollm2-135m", "gemma3-270m"} <= {m.id for m in models.data}
    reply = await alice.chat.completions.create(model="smollm2-135m", max_tokens=24,
                                                messages=[{"role": "user", "content": "What is 2+3?"}])
    assert reply.choices[0].message.content and reply.choices[0].message.role == "assistant"
    assert reply.model == "smollm2-135m" and reply.usage and reply.usage.completion_tokens > 0
    stream = await alice.chat.completions.create(
        model="smollm2-135m", max_tokens=24, stream=True,
        messages=[{"role": "system", "content": "Answer briefly."},
                  {"role": "user", "content": "Name three colors."}])
    pieces, finish = [], None
    async for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        if chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        finish = chunk.choices[0].finish_reason or finish
    assert "".join(pieces).strip() and finish in ("stop", "length")


async def test_keys_identity_and_isolation(system):
    alice, bob = client(system, "sk-alice"), client(system, "sk-bob")
    with pytest.raises(AuthenticationError):
        await client(system, "sk-mallory").chat.completions.create(
            model="auto", messages=[{"role": "user", "content": "hi"}])
    reply = await alice.chat.completions.create(model="smollm2-135m", max_tokens=8, user="bob",  # cannot pose as bob
                                                messages=[{"role": "user", "content": "Say yes."}])
    request_id = reply.model_extra["flywheel"]["request_id"]  # type: ignore[index]
    async with httpx.AsyncClient(base_url=system) as http:
        own = await http.post("/v1/feedback", headers={"Authorization": "Bearer sk-alice"},
                              json={"request_id": request_id, "kind": "thumbs", "thumbs_up": True})
        assert own.status_code == 200, own.text
        stolen = await http.post("/v1/feedback", headers={"Authorization": "Bearer sk-bob"},
                                 json={"request_id": request_id, "kind": "thumbs", "thumbs_up": False})
        assert stolen.status_code == 403 and stolen.json()["error"]["type"] == "permission_error"
    with pytest.raises(PermissionDeniedError):
        await bob.post("/feedback", cast_to=dict, body={"request_id": request_id, "kind": "rating", "rating": 0.1})


async def test_bad_input_gets_clear_4xx(system):
    alice = client(system, "sk-alice")
    with pytest.raises(BadRequestError, match="max_tokens"):
        await alice.chat.completions.create(model="auto", max_tokens=100_000,
                                            messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(BadRequestError, match="messages"):
        await alice.chat.completions.create(model="auto", messages=[])
    with pytest.raises(NotFoundError, match="gpt-9"):
        await alice.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(BadRequestError, match="characters"):
        await alice.chat.completions.create(model="auto", messages=[{"role": "user", "content": "x" * 40_000}])
    async with httpx.AsyncClient(base_url=system) as http:
        huge = await http.post("/v1/chat/completions", headers={"Authorization": "Bearer sk-alice"},
                               content=b"{" + b" " * 2_000_000 + b"}")
        assert huge.status_code == 413
        garbage = await http.post("/v1/chat/completions", headers={"Authorization": "Bearer sk-alice",
                                                                   "content-type": "application/json"},
                                  content=b"\xff\xfe not json")
        assert garbage.status_code == 400


@pytest.mark.browser
async def test_dashboard_renders_live_data_in_headless_chromium(system, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Debian's chromium package is required (./dev.sh test installs it)"
    alice = client(system, "sk-alice")
    await alice.chat.completions.create(model="smollm2-135m", max_tokens=8,
                                        messages=[{"role": "user", "content": "One word: hello."}])
    await asyncio.sleep(3)  # the gateway's observer folds the response and the decision
    dom = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path}", "--virtual-time-budget=6000", "--dump-dom", f"{system}/dashboard"],
        capture_output=True, text=True, timeout=120, check=False).stdout
    points = dict(re.findall(r'id="([a-z-]+)" data-points="(\d+)"', dom))
    rows = dict(re.findall(r'id="([a-z-]+)" data-rows="(\d+)"', dom))
    served = re.search(r'id="kpi-served">(\d+)<', dom)
    assert served and int(served.group(1)) >= 1, dom[:2000]
    assert int(points["throughput"]) >= 1 and int(points["latency"]) >= 1 and int(points["routing"]) >= 1
    assert int(points["routing-curve"]) >= 1
    assert int(rows["workers"]) >= 1
    assert int(rows["learners"]) == 4  # router, personaliser, rewarder, trainer
