"""Request and response bodies of the OpenAI-compatible API, validated with pydantic.

Only what Flywheel can honour is accepted: one choice (``n`` = 1), text content, bounded sizes.
Flywheel's own knobs ride in the body as extra fields (``extra_body`` in the openai client):
``budget_usd``, ``willingness_to_pay``, ``slo_class``, ``deadline_ms``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = "auto"
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=1)
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    user: str | None = Field(default=None, max_length=256)
    # Flywheel extensions
    budget_usd: float | None = Field(default=None, ge=0.0, le=1e6)
    willingness_to_pay: float | None = Field(default=None, ge=0.0, le=1e12)
    slo_class: Literal["interactive", "standard", "batch"] = "standard"
    deadline_ms: int | None = Field(default=None, ge=0)

    @field_validator("stop")
    @classmethod
    def _bounded_stop(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4 or any(len(s) > 64 for s in stops):
            raise ValueError("at most 4 stop sequences of at most 64 characters")
        return stops

    def requested_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class FeedbackRequest(BaseModel):
    """Feedback about the caller's own responses. Ids are bare request ids or the ``chatcmpl-<id>``
    the OpenAI API returned. The model, model version and adapter version are filled in by the
    gateway from what it served (a pairwise preference needs only ``request_id_a``,
    ``request_id_b`` and ``winner``; ``request_id`` defaults to ``request_id_a`` for it)."""


    model_config = ConfigDict(extra="forbid")

    request_id: str | None = Field(default=None, min_length=1, max_length=140)
    kind: Literal["rating", "thumbs", "pairwise", "implicit"]
    rating: float | None = Field(default=None, ge=0.0, le=1.0)
    thumbs_up: bool | None = None
    pairwise: dict[str, Any] | None = None
    implicit: dict[str, Any] | None = None
    user: str | None = Field(default=None, max_length=256)
    """Who gives the feedback when the gateway runs without API keys (as in chat completions);
    with keys the bearer key names the user and this field cannot override it."""


def openai_error(message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
