"""The rewarder agent, tested the way users test their own consumers: replay a recorded feedback
topic through the real agent process and compare its rewards with a golden recording."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from pathlib import Path

import pytest

from streams.kafka import EventProducer
from streams.replay import record
from streams.testing import golden_replay
from tests.conftest import flywheel_env
from tests.factories import FIXED_TIME

pytestmark = pytest.mark.integration
GOLDEN = Path(__file__).resolve().parent.parent / "golden"


def feedback_events() -> list[dict]:
    base: dict = {"tenant_id": "t", "model": "smollm2-135m", "prompt": None, "rating": None, "thumbs_up": None,
            "pairwise": None, "implicit": None}
    items: list[tuple[str, str, str, dict]] = [
        ("f1", "u1", "r1", {"kind": "thumbs", "thumbs_up": True}),
        ("f2", "u2", "r2", {"kind": "rating", "rating": 0.25}),
        ("f3", "u1", "r3", {"kind": "pairwise", "pairwise": {"request_id_a": "r3", "model_a": "smollm2-135m",
                                                             "request_id_b": "r4", "model_b": "gemma3-270m",
                                                             "winner": "b"}}),
        ("f4", "u3", "r5", {"kind": "implicit", "implicit": {"signal": "regenerate", "edited_text": None,
                                                             "dwell_ms": None}}),
        ("f5", "u3", "r6", {"kind": "rating", "rating": 3.5}),  # invalid: dead-lettered, no reward
        ("f6", "u2", "r7", {"kind": "implicit", "implicit": {"signal": "dwell", "edited_text": None,
                                                             "dwell_ms": 30000}}),
    ]
    return [base | {"event_id": eid, "correlation_id": rid, "user_id": user, "event_time": FIXED_TIME + i,
                    "request_id": rid} | extra for i, (eid, user, rid, extra) in enumerate(items)]


async def _make_input_recording(services, path: Path) -> None:
    producer = EventProducer(services.kafka, services.serde, services.capabilities)
    await producer.start()
    try:
        for event in feedback_events():
            await producer.send_and_wait(services.catalog.feedback, event, key=event["user_id"])
    finally:
        await producer.stop()
    await record(services.kafka, services.registry, [services.catalog.feedback], path)


@contextlib.asynccontextmanager
async def rewarder_process(prefix: str):
    proc = subprocess.Popen([sys.executable, "-m", "flywheel.cli", "rewarder"],
                            env=flywheel_env(FLYWHEEL_TOPIC_PREFIX=prefix, FLYWHEEL_LOG_LEVEL="WARNING"))
    try:
        yield proc
    finally:
        proc.terminate()
        await asyncio.to_thread(proc.wait, 30)


async def test_rewarder_matches_golden_rewards(services, tmp_path):
    recording = GOLDEN / "feedback.avro"
    if not recording.exists():  # first run on a new contract: regenerate deliberately
        await _make_input_recording(services, tmp_path / "feedback.avro")
        (tmp_path / "feedback.avro").replace(recording)
    diff = await golden_replay(services, recording, ["rewards"], rewarder_process, GOLDEN / "rewards.avro",
                               ignore=("event_time",))
    assert diff.ok, diff.explain()
    assert sum(len(v) for v in diff.actual.values()) == 6  # f5 is a dead letter; f3 rewards two responses
