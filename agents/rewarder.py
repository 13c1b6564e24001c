"""The rewarder agent: Feedback -> Reward events for the trainer (rule in ``core.rewards``).

Reward event ids are derived from the feedback's event id, so re-processing (at-least-once on
Tansu, or a replay) produces the same ids and the trainer counts each reward once.
"""

from __future__ import annotations

import hashlib
from typing import Any

import faust

from agents.base import FaustSink, decode, exits_on_error, make_app, raw_topic, run_agent_process
from core.errors import DeadLetterError
from core.rewards import rewards_from_feedback
from flywheel.connect import Services
from flywheel.settings import Settings
from streams.dlq import DeadLetters
from streams.events import event_time_ms
from streams.tracing import process_context


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
        async for event in stream.events():
            message = event.message
            feedback = await decode(services, event, dlq)
            if feedback is None:
                continue
            with process_context(message.topic, message.headers, message.partition, message.offset):
                try:
                    for reward in reward_events(feedback):
                        await sink.send(catalog.rewards, reward, key=reward["request_id"])
                except DeadLetterError as exc:
                    await dlq.publish(topic=message.topic, partition=message.partition, offset=message.offset,
                                      key=message.key, value=message.value, headers=list(message.headers or []),
                                      error=exc, event=feedback)

    return app


def main(settings: Settings) -> int:
    return run_agent_process("rewarder", settings, build)
