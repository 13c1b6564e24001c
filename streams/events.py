"""Constructors for events: every event gets the envelope (event id, correlation id, tenant,
user, event time) the same way, so glue code never forgets a field."""

from __future__ import annotations

import time
import uuid
from typing import Any


def now_ms() -> int:
    return int(time.time() * 1000)


def new_id() -> str:
    return uuid.uuid4().hex


def envelope(correlation_id: str, tenant_id: str, user_id: str, event_id: str | None = None,
             event_time_ms: int | None = None) -> dict[str, Any]:
    return {
        "event_id": event_id or new_id(),
        "correlation_id": correlation_id,
        "tenant_id": tenant_id,
        "user_id": user_id,
        "event_time": event_time_ms if event_time_ms is not None else now_ms(),
    }


def event_time_ms(event: dict[str, Any]) -> int:
    """Event time as epoch milliseconds (the serde decodes it so; a datetime is accepted too)."""
    value = event["event_time"]
    if isinstance(value, int):
        return value
    return int(value.timestamp() * 1000)


def inference_request(
    *, user_id: str, tenant_id: str = "default", prompt: str | None = None,
    messages: list[dict[str, str]] | None = None, max_tokens: int = 128, temperature: float = 0.0,
    top_p: float = 1.0, seed: int | None = None, stop: list[str] | None = None,
    budget_usd: float | None = None, willingness_to_pay: float | None = None,
    slo_class: str = "standard", deadline_ms: int | None = None, model_hints: list[str] | None = None,
    stream: bool = False, request_id: str | None = None, metadata: dict[str, str] | None = None,
) -> dict[str, Any]:
    """An InferenceRequest event; exactly one of ``prompt`` and ``messages`` must be given."""
    if (prompt is None) == (not messages):
        raise ValueError("give exactly one of prompt and messages")
    rid = request_id or new_id()
    return {
        **envelope(rid, tenant_id, user_id),
        "request_id": rid,
        "prompt": prompt,
        "messages": messages or [],
        "model_hints": model_hints or [],
        "budget_usd": budget_usd,
        "willingness_to_pay": willingness_to_pay,
        "slo_class": slo_class,
        "deadline": deadline_ms,
        "max_tokens": max_tokens,
        "sampling": {"temperature": temperature, "top_p": top_p, "seed": seed, "stop": stop or []},
        "stream": stream,
        "metadata": metadata or {},
    }


def feedback(
    *, user_id: str, request_id: str, kind: str, tenant_id: str = "default", model: str | None = None,
    prompt: str | None = None, rating: float | None = None, thumbs_up: bool | None = None,
    pairwise: dict[str, Any] | None = None, implicit: dict[str, Any] | None = None,
    model_version: str | None = None, adapter_version: str | None = None,
) -> dict[str, Any]:
    return {
        **envelope(request_id, tenant_id, user_id),
        "request_id": request_id,
        "model": model,
        "prompt": prompt,
        "kind": kind,
        "rating": rating,
        "thumbs_up": thumbs_up,
        "pairwise": pairwise,
        "implicit": implicit,
        "model_version": model_version,
        "adapter_version": adapter_version,
    }


def prompt_text(request: dict[str, Any]) -> str:
    """The text the router embeds: the prompt, or the last user message of a chat."""
    if request.get("prompt"):
        return str(request["prompt"])
    for message in reversed(request.get("messages") or []):
        if message["role"] == "user":
            return str(message["content"])
    return ""
