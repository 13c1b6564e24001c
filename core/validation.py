"""Semantic checks of events that decode but may still be unusable (the Avro schema cannot say
"non-negative" or "at most N characters"). A violation raises ``ValidationError``, which a stage
turns into a dead letter with the message as its reason."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from core.errors import ValidationError


@dataclass(frozen=True)
class RequestLimits:
    max_prompt_chars: int = 32_000
    """Total characters over the prompt and all messages."""
    max_tokens: int = 1024
    max_willingness_to_pay: float = 1e12


def _finite(name: str, value: float) -> None:
    if math.isnan(value) or math.isinf(value):
        raise ValidationError(f"{name} must be a finite number, got {value!r}")


def validate_request(request: dict[str, Any], limits: RequestLimits) -> None:
    """Raise ValidationError naming the first problem with an InferenceRequest."""
    if not request.get("user_id"):
        raise ValidationError("user_id is empty")
    if not request.get("request_id"):
        raise ValidationError("request_id is empty")
    prompt, messages = request.get("prompt"), request.get("messages") or []
    if (prompt is None) == (not messages):
        raise ValidationError("exactly one of prompt and messages must be given")
    size = len(prompt or "") + sum(len(m["content"]) for m in messages)
    if size > limits.max_prompt_chars:
        raise ValidationError(f"prompt of {size} characters exceeds the limit of {limits.max_prompt_chars}")
    texts = [prompt] if prompt is not None else [m["content"] for m in messages if m["role"] == "user"]
    if not any(t.strip() for t in texts):
        raise ValidationError("the prompt (or every user message) is empty")
    if not 1 <= request["max_tokens"] <= limits.max_tokens:
        raise ValidationError(f"max_tokens must be in [1, {limits.max_tokens}], got {request['max_tokens']}")
    budget = request.get("budget_usd")
    if budget is not None:
        _finite("budget_usd", budget)
        if budget < 0:
            raise ValidationError(f"budget_usd must be >= 0, got {budget}")
    wtp = request.get("willingness_to_pay")
    if wtp is not None:
        _finite("willingness_to_pay", wtp)
        if not 0 <= wtp <= limits.max_willingness_to_pay:
            raise ValidationError(f"willingness_to_pay must be in [0, {limits.max_willingness_to_pay:g}], got {wtp}")
    sampling = request["sampling"]
    _finite("temperature", sampling["temperature"])
    _finite("top_p", sampling["top_p"])
    if not 0.0 <= sampling["temperature"] <= 2.0:
        raise ValidationError(f"temperature must be in [0, 2], got {sampling['temperature']}")
    if not 0.0 < sampling["top_p"] <= 1.0:
        raise ValidationError(f"top_p must be in (0, 1], got {sampling['top_p']}")
    if len(sampling.get("stop") or []) > 4:
        raise ValidationError("at most 4 stop sequences")
