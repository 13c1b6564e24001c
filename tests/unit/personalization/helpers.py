"""Builders for scripted feedback (plain data, no mocks)."""

from __future__ import annotations

import itertools
from typing import Any

from core.personalization import FeedbackEvent, FeedbackKind, ShownResponse

_ids = itertools.count()


def shown(prompt: str, text: str, request_id: str | None = None) -> ShownResponse:
    return ShownResponse(request_id or f"req-{next(_ids)}", prompt, text)


def event(kind: FeedbackKind, response: ShownResponse, t: float, user: str = "u1",
          **fields: Any) -> FeedbackEvent:
    return FeedbackEvent(event_id=f"evt-{next(_ids)}", user_id=user, event_time_s=t, kind=kind,
                         response=response, **fields)
