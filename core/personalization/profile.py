"""A user's profile, folded from feedback events one at a time.

A :class:`FeedbackEvent` is the pure mirror of the ``Feedback`` Avro contract after the agent has
joined in the texts of the responses it refers to (responses are named by the ``request_id`` that
produced them; a regenerate makes a new request for the same prompt). Exactly one kind per event,
like the contract: rating, thumbs, pairwise, or one implicit signal (regenerate, edit, accept,
dwell).

:class:`UserProfile` keeps (a) running statistics the strategy and operators read (counts, rate,
rating and dwell averages) and (b) a bounded memory of the responses the user was recently shown,
with what the user did to each. The memory is what lets a later event become a training signal:
an accept on response B for a prompt whose earlier response A was regenerated means "B over A".

Invariants: folding is a pure function of (profile, event, config); the memory never holds more
than ``ProfileConfig.max_memory`` responses (oldest dropped first); ``to_json``/``from_json``
round-trip exactly, so the agent can keep the profile in a JSONB column.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from typing import Any


class FeedbackKind(StrEnum):
    RATING = "rating"
    THUMBS = "thumbs"
    PAIRWISE = "pairwise"
    REGENERATE = "regenerate"
    EDIT = "edit"
    ACCEPT = "accept"
    DWELL = "dwell"


@dataclass(frozen=True)
class ShownResponse:
    """A response the user saw: the request that produced it, its prompt and its text."""

    request_id: str
    prompt: str
    text: str


@dataclass(frozen=True)
class FeedbackEvent:
    """One piece of feedback about ``response`` (and ``other`` for a pairwise preference)."""

    event_id: str
    user_id: str
    event_time_s: float
    """Seconds on any clock that only moves forward (the event time of the Feedback record)."""
    kind: FeedbackKind
    response: ShownResponse
    rating: float | None = None
    """Graded score in [0, 1] (the contract's scale), for ``RATING``."""
    thumbs_up: bool | None = None
    other: ShownResponse | None = None
    """The second response of a ``PAIRWISE`` comparison (``response`` is side ``a``)."""
    winner: str | None = None
    """``"a"`` (response), ``"b"`` (other) or ``"tie"``, for ``PAIRWISE``."""
    edited_text: str | None = None
    dwell_s: float | None = None
    """How long the user stayed on the response, for ``DWELL`` (and optionally ``ACCEPT``)."""

    def __post_init__(self) -> None:
        k = self.kind
        if k is FeedbackKind.RATING and (self.rating is None or not 0.0 <= self.rating <= 1.0):
            raise ValueError(f"a rating event needs rating within [0, 1], got {self.rating}")
        if k is FeedbackKind.THUMBS and self.thumbs_up is None:
            raise ValueError("a thumbs event needs thumbs_up")
        if k is FeedbackKind.PAIRWISE and (self.other is None or self.winner not in ("a", "b", "tie")):
            raise ValueError(f"a pairwise event needs other and winner in a/b/tie, got {self.winner!r}")
        if k is FeedbackKind.EDIT and not self.edited_text:
            raise ValueError("an edit event needs a non-empty edited_text")
        if k is FeedbackKind.DWELL and self.dwell_s is None:
            raise ValueError("a dwell event needs dwell_s")
        if self.dwell_s is not None and (self.dwell_s < 0 or math.isnan(self.dwell_s)):
            raise ValueError(f"dwell_s must be >= 0, got {self.dwell_s}")


@dataclass(frozen=True)
class ProfileConfig:
    max_memory: int = 64
    """Responses remembered per user; older ones can no longer be paired with new feedback."""
    rate_half_life_s: float = 1800.0
    """Half-life of the decayed event counter behind ``events_per_hour``."""
    rate_min_window_s: float = 600.0
    """The rate of a new user is measured over at least this long (a first burst is not a trend)."""
    average_half_life: float = 20.0
    """Half-life, in events, of the rating and dwell averages."""

    def __post_init__(self) -> None:
        if self.max_memory < 1:
            raise ValueError(f"max_memory must be >= 1, got {self.max_memory}")
        if self.rate_half_life_s <= 0 or self.average_half_life <= 0 or self.rate_min_window_s <= 0:
            raise ValueError(f"half-lives and window must be > 0, got rate={self.rate_half_life_s}, "
                             f"average={self.average_half_life}, window={self.rate_min_window_s}")


@dataclass(frozen=True)
class ResponseMemory:
    """What the profile remembers about one shown response."""

    request_id: str
    prompt: str
    text: str
    time_s: float
    score: float | None = None
    """Latest explicit judgement in [0, 1]: rating, thumbs (1/0) or accept (1)."""
    regenerated: bool = False
    accepted: bool = False
    dwell_s: float | None = None


def prompt_key(prompt: str) -> str:
    """Prompts are matched after whitespace normalisation (chat UIs resend with stray spaces)."""
    return " ".join(prompt.split())


@dataclass(frozen=True)
class UserProfile:
    user_id: str
    n_events: int = 0
    counts: Mapping[str, int] = field(default_factory=dict)
    """Events seen per :class:`FeedbackKind` value."""
    first_time_s: float | None = None
    last_time_s: float | None = None
    rate_acc: float = 0.0
    """Decayed event counter: steady input at r events/s converges to r * tau, tau = half-life / ln 2."""
    rating_avg: float | None = None
    dwell_avg_s: float | None = None
    next_seq: int = 0
    """Sequence number the next training signal gets (signals are numbered per user, from 0)."""
    memory: tuple[ResponseMemory, ...] = ()

    def events_per_hour(self, cfg: ProfileConfig, now_s: float | None = None) -> float:
        """Recent feedback rate (decayed counter, read at ``now_s`` or at the last event)."""
        if self.last_time_s is None or self.first_time_s is None:
            return 0.0
        return decayed_rate_per_hour(self.rate_acc, first_s=self.first_time_s, last_s=self.last_time_s,
                                     now_s=now_s if now_s is not None else self.last_time_s,
                                     half_life_s=cfg.rate_half_life_s, min_window_s=cfg.rate_min_window_s)

    def find(self, request_id: str) -> ResponseMemory | None:
        for m in reversed(self.memory):
            if m.request_id == request_id:
                return m
        return None

    def same_prompt(self, prompt: str, exclude: str | None = None) -> list[ResponseMemory]:
        key = prompt_key(prompt)
        return [m for m in self.memory if prompt_key(m.prompt) == key and m.request_id != exclude]

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["counts"] = dict(self.counts)
        data["memory"] = [asdict(m) for m in self.memory]
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> UserProfile:
        fields = dict(data)
        fields["counts"] = {str(k): int(v) for k, v in dict(fields.get("counts", {})).items()}
        fields["memory"] = tuple(ResponseMemory(**m) for m in fields.get("memory", ()))
        return cls(**fields)


def decayed_rate_per_hour(acc: float, *, first_s: float, last_s: float, now_s: float, half_life_s: float,
                          min_window_s: float) -> float:
    """Rate from a decayed counter ``acc`` (last incremented at ``last_s``), bias-corrected.

    A counter that decays with time constant tau and gains 1 per event converges to r * tau for
    a steady rate r, but only after a few tau; dividing by tau * (1 - exp(-W / tau)), W the time
    since the first event (at least ``min_window_s``), makes the estimate unbiased from the start.
    """
    tau = half_life_s / math.log(2)
    current = acc * math.exp(-max(0.0, now_s - last_s) / tau)
    window = max(now_s - first_s, min_window_s)
    return current / (tau * -math.expm1(-window / tau)) * 3600.0


def _ema(old: float | None, value: float, half_life: float) -> float:
    if old is None:
        return value
    alpha = 1.0 - 0.5 ** (1.0 / half_life)
    return old + alpha * (value - old)


def _remember(memory: tuple[ResponseMemory, ...], shown: ShownResponse, time_s: float,
              cfg: ProfileConfig, **changes: Any) -> tuple[ResponseMemory, ...]:
    """Update (or insert) the memory entry of ``shown``; the touched entry moves to the newest end."""
    kept = [m for m in memory if m.request_id != shown.request_id]
    old = next((m for m in memory if m.request_id == shown.request_id), None)
    entry = old or ResponseMemory(shown.request_id, shown.prompt, shown.text, time_s)
    entry = replace(entry, time_s=time_s, **changes)
    kept.append(entry)
    return tuple(kept[-cfg.max_memory:])


def fold_feedback(profile: UserProfile, event: FeedbackEvent, cfg: ProfileConfig,
                  signals_emitted: int = 0) -> UserProfile:
    """The profile after ``event``; ``signals_emitted`` advances the signal sequence counter."""
    if event.user_id != profile.user_id:
        raise ValueError(f"event for user {event.user_id!r} folded into profile of {profile.user_id!r}")
    t = event.event_time_s
    tau = cfg.rate_half_life_s / math.log(2)
    rate_acc = 1.0
    if profile.last_time_s is not None:
        rate_acc = profile.rate_acc * math.exp(-max(0.0, t - profile.last_time_s) / tau) + 1.0
    counts = dict(profile.counts)
    counts[event.kind.value] = counts.get(event.kind.value, 0) + 1
    rating_avg = profile.rating_avg
    dwell_avg = profile.dwell_avg_s
    memory = profile.memory
    k = event.kind
    if k is FeedbackKind.RATING and event.rating is not None:
        rating_avg = _ema(rating_avg, event.rating, cfg.average_half_life)
        memory = _remember(memory, event.response, t, cfg, score=event.rating)
    elif k is FeedbackKind.THUMBS:
        memory = _remember(memory, event.response, t, cfg, score=1.0 if event.thumbs_up else 0.0)
    elif k is FeedbackKind.PAIRWISE and event.other is not None:
        memory = _remember(memory, event.response, t, cfg)
        memory = _remember(memory, event.other, t, cfg)
    elif k is FeedbackKind.REGENERATE:
        memory = _remember(memory, event.response, t, cfg, regenerated=True)
    elif k is FeedbackKind.EDIT:
        memory = _remember(memory, event.response, t, cfg, accepted=True)
    elif k is FeedbackKind.ACCEPT:
        extra: dict[str, Any] = {"accepted": True, "score": 1.0}
        if event.dwell_s is not None:
            extra["dwell_s"] = event.dwell_s
        memory = _remember(memory, event.response, t, cfg, **extra)
    elif k is FeedbackKind.DWELL and event.dwell_s is not None:
        memory = _remember(memory, event.response, t, cfg, dwell_s=event.dwell_s)
    if event.dwell_s is not None:
        dwell_avg = _ema(dwell_avg, event.dwell_s, cfg.average_half_life)
    return replace(
        profile,
        n_events=profile.n_events + 1,
        counts=counts,
        first_time_s=profile.first_time_s if profile.first_time_s is not None else t,
        last_time_s=max(t, profile.last_time_s) if profile.last_time_s is not None else t,
        rate_acc=rate_acc,
        rating_avg=rating_avg,
        dwell_avg_s=dwell_avg,
        next_seq=profile.next_seq + signals_emitted,
        memory=memory,
    )


def feedback_event_from_record(
    record: Mapping[str, Any], lookup: Callable[[str], ShownResponse | None]
) -> FeedbackEvent | None:
    """Map a decoded ``Feedback`` record to a :class:`FeedbackEvent`.

    ``lookup(request_id)`` returns the response that request produced (the agent joins it from
    InferenceResponse and the request's prompt). Returns ``None`` when a response it needs is
    unknown (e.g. its response was never seen): such feedback cannot become a training signal.
    """
    response = lookup(str(record["request_id"]))
    if response is None:
        return None
    kind = str(record["kind"])
    base: dict[str, Any] = {
        "event_id": str(record["event_id"]),
        "user_id": str(record["user_id"]),
        "event_time_s": float(record["event_time"]) / 1000.0,
        "response": response,
    }
    if kind == "rating":
        return FeedbackEvent(kind=FeedbackKind.RATING, rating=float(record["rating"]), **base)
    if kind == "thumbs":
        return FeedbackEvent(kind=FeedbackKind.THUMBS, thumbs_up=bool(record["thumbs_up"]), **base)
    if kind == "pairwise":
        pair = record["pairwise"]
        a, b = lookup(str(pair["request_id_a"])), lookup(str(pair["request_id_b"]))
        if a is None or b is None:
            return None
        base["response"] = a
        return FeedbackEvent(kind=FeedbackKind.PAIRWISE, other=b, winner=str(pair["winner"]), **base)
    implicit = record["implicit"]
    dwell_ms = implicit.get("dwell_ms")
    dwell = float(dwell_ms) / 1000.0 if dwell_ms is not None else None
    return FeedbackEvent(kind=FeedbackKind(str(implicit["signal"])), edited_text=implicit.get("edited_text"),
                         dwell_s=dwell, **base)
