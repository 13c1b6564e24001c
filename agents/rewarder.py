"""The rewarder agent: Feedback -> Reward events for the trainer (rule in ``core.rewards``).

Reward event ids are derived from the feedback's event id, so re-processing (at-least-once on
Tansu, or a replay) produces the same ids and the trainer counts each reward once.
"""

from __future__ import annotations

import hashlib
from typing import Any

import faust

from agents.base import FaustSink, exits_on_error, make_app, process_each, raw_topic, run_agent_process
from core.rewards import rewards_from_feedback
from infra.connect import Services
from infra.settings import Settings
from streams.dlq import DeadLetters
from streams.events import event_time_ms


def reward_events(feedback: dict[str, Any]) -> list[dict[str, Any]]:
    """The Reward events for one Feedback event (pure; deterministic ids and times)."""
    out = []
    for assignment in rewards_from_feedback(feedback):
        event_id = hashlib.sha256(f"{feedback['event_id']}:{assignment.request_id}".encode()).hexdigest()[:32]
        out.append({
            "event_id": event_id,
            "correlation_id": assignment.request_id,
            "tenant_id": feedback["tenant_id"],
            "user_id": feedback["user_id"],
            "event_time": event_time_ms(feedback),
            "request_id": assignment.request_id,
            "reward": assignment.reward,
            "source": "feedback",
            "feedback_id": feedback["event_id"],
        })
    return out


def build(services: Services) -> faust.App:
    app = make_app("rewarder", services)
    sink = FaustSink(app, services)
    dlq = DeadLetters(sink, services.catalog.dlq("rewarder"), "rewarder")  # type: ignore[arg-type]
    catalog = services.catalog

    @app.agent(raw_topic(app, catalog.feedback), name="feedback-to-rewards")
    @exits_on_error
    async def feedback_to_rewards(stream: Any) -> None:
        async def handle(feedback: dict[str, Any]) -> None:
            for reward in reward_events(feedback):
                await sink.send(catalog.rewards, reward, key=reward["request_id"])

        await process_each(stream, services, dlq, handle)

    return app


def main(settings: Settings) -> int:
    return run_agent_process("rewarder", settings, build)
