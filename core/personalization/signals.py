"""Feedback -> self-supervised training signals, with documented weights.

Two kinds of signal train a user's adapter:

* :class:`PreferencePair` ``(prompt, chosen, rejected, weight)`` for the DPO-style loss;
* :class:`SftTarget` ``(prompt, target, weight)`` for next-token loss on a response the user
  endorsed (an accepted response, or the user's own edit).

Rules (each event is read against the profile *before* it is folded in):

=================  ========================================================  ====================
event              signal                                                    weight
=================  ========================================================  ====================
pairwise a/b       winner over loser (same prompt only; tie: nothing)         ``pairwise``
edit of R into E   E over R, and SFT target E                                ``edit_pair``,
                                                                             ``edit_sft``
accept of R        R over every remembered response to the same prompt the  ``regenerate_pair``
                   user regenerated; SFT target R                            ``accept_sft`` x dwell
rating / thumbs    positive (>= ``positive_score``): as accept's pairs (no   ``regenerate_pair``
                   SFT); and vs every remembered rated response to the same  ``rating_pair`` x
                   prompt differing by >= ``min_score_gap``: higher over       min(1, gap / 0.5)
                   lower
regenerate, dwell  no signal by themselves: they mark memory that later
                   events pair against (regenerated) or weigh (dwell)
=================  ========================================================  ====================

Why these weights: an explicit comparison or the user's own edit is the most direct evidence
(1.0); a regenerate is implicit and sometimes just curiosity (0.7); two separate ratings are on a
noisy absolute scale, so their pair counts in proportion to the gap; accepting a response says it
was acceptable, not that it was ideal, so as an SFT target it counts little (0.3), scaled by how
long the user read it (dwell / ``dwell_full_s``, within [0.25, 1]; 0.5 when unknown).

Every signal carries a per-user sequence number (``seq``), the source event id and time, so the
strategy can tell pending signals (after the last update) from replay candidates.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from core.personalization.profile import (
    FeedbackEvent,
    FeedbackKind,
    ProfileConfig,
    ResponseMemory,
    ShownResponse,
    UserProfile,
    fold_feedback,
)


@dataclass(frozen=True)
class SignalWeights:
    pairwise: float = 1.0
    """Explicit a/b preference."""
    edit_pair: float = 1.0
    """The user's edit over the response it edited."""
    edit_sft: float = 1.0
    """The user's edit as an SFT target."""
    regenerate_pair: float = 0.7
    """An endorsed response over a response to the same prompt that the user regenerated."""
    rating_pair: float = 0.8
    """Two rated responses to one prompt, scaled by min(1, gap / 0.5)."""
    accept_sft: float = 0.3
    """An accepted response as an SFT target, scaled by the dwell factor."""
    min_score_gap: float = 0.25
    """Smallest rating difference (on [0, 1]) that makes a rating pair."""
    positive_score: float = 0.75
    """A rating at or above this (or a thumbs up) endorses the response."""
    dwell_full_s: float = 20.0
    """Dwell at which an accept counts fully as an SFT target."""

    def __post_init__(self) -> None:
        for name in ("pairwise", "edit_pair", "edit_sft", "regenerate_pair", "rating_pair", "accept_sft"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"weight {name} must be within [0, 1], got {value}")
        if not 0.0 < self.min_score_gap <= 1.0 or not 0.0 < self.positive_score <= 1.0:
            raise ValueError(f"min_score_gap={self.min_score_gap} and positive_score={self.positive_score} "
                             "must be within (0, 1]")
        if self.dwell_full_s <= 0:
            raise ValueError(f"dwell_full_s must be > 0, got {self.dwell_full_s}")

    def dwell_factor(self, dwell_s: float | None) -> float:
        if dwell_s is None:
            return 0.5
        return min(1.0, max(0.25, dwell_s / self.dwell_full_s))


def _signal_id(*parts: str) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part.encode())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class PreferencePair:
    prompt: str
    chosen: str
    rejected: str
    weight: float
    source: str
    """Which rule made it (``pairwise``, ``edit``, ``regenerate``, ``rating``)."""
    event_id: str
    time_s: float
    seq: int
    """Per-user sequence number; pending signals have seq > the strategy's last_trained_seq."""

    @property
    def signal_id(self) -> str:
        """Content id: the same comparison from the same event always gets the same id (dedupe)."""
        return _signal_id(self.prompt, self.chosen, self.rejected, self.event_id)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PreferencePair:
        return cls(**data)


@dataclass(frozen=True)
class SftTarget:
    prompt: str
    target: str
    weight: float
    source: str
    """``accept`` or ``edit``."""
    event_id: str
    time_s: float
    seq: int

    @property
    def signal_id(self) -> str:
        return _signal_id(self.prompt, self.target, self.event_id)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SftTarget:
        return cls(**data)


@dataclass(frozen=True)
class TrainingSignals:
    pairs: tuple[PreferencePair, ...] = ()
    sft: tuple[SftTarget, ...] = ()

    def __len__(self) -> int:
        return len(self.pairs) + len(self.sft)


class _Builder:
    """Collects signals for one event, numbering them from the profile's next_seq."""

    def __init__(self, event: FeedbackEvent, next_seq: int) -> None:
        self.event = event
        self.seq = next_seq
        self.pairs: list[PreferencePair] = []
        self.sft: list[SftTarget] = []

    def pair(self, prompt: str, chosen: str, rejected: str, weight: float, source: str) -> None:
        if weight <= 0.0 or chosen == rejected:
            return
        self.pairs.append(PreferencePair(prompt, chosen, rejected, weight, source,
                                         self.event.event_id, self.event.event_time_s, self.seq))
        self.seq += 1

    def target(self, prompt: str, text: str, weight: float, source: str) -> None:
        if weight <= 0.0 or not text.strip():
            return
        self.sft.append(SftTarget(prompt, text, weight, source, self.event.event_id,
                                  self.event.event_time_s, self.seq))
        self.seq += 1


def _endorse(b: _Builder, profile: UserProfile, shown: ShownResponse, w: SignalWeights) -> None:
    """``text`` was endorsed: it beats every remembered regenerated response to the same prompt."""
    for old in profile.same_prompt(shown.prompt, exclude=shown.request_id):
        if old.regenerated:
            b.pair(shown.prompt, shown.text, old.text, w.regenerate_pair, "regenerate")


def _rated(b: _Builder, profile: UserProfile, event: FeedbackEvent, score: float, w: SignalWeights) -> None:
    shown = event.response
    others: list[ResponseMemory] = [
        m for m in profile.same_prompt(shown.prompt, exclude=shown.request_id) if m.score is not None
    ]
    for old in others:
        assert old.score is not None
        gap = score - old.score
        if abs(gap) < w.min_score_gap:
            continue
        weight = w.rating_pair * min(1.0, abs(gap) / 0.5)
        if gap > 0:
            b.pair(shown.prompt, shown.text, old.text, weight, "rating")
        else:
            b.pair(shown.prompt, old.text, shown.text, weight, "rating")
    if score >= w.positive_score:
        _endorse(b, profile, shown, w)


def extract_signals(profile: UserProfile, event: FeedbackEvent, weights: SignalWeights) -> TrainingSignals:
    """The training signals ``event`` yields, read against ``profile`` (before folding the event)."""
    b = _Builder(event, profile.next_seq)
    shown = event.response
    k = event.kind
    if k is FeedbackKind.PAIRWISE and event.other is not None and event.winner in ("a", "b"):
        other = event.other
        if " ".join(other.prompt.split()) == " ".join(shown.prompt.split()):
            win, lose = (shown, other) if event.winner == "a" else (other, shown)
            b.pair(shown.prompt, win.text, lose.text, weights.pairwise, "pairwise")
    elif k is FeedbackKind.EDIT and event.edited_text:
        b.pair(shown.prompt, event.edited_text, shown.text, weights.edit_pair, "edit")
        b.target(shown.prompt, event.edited_text, weights.edit_sft, "edit")
    elif k is FeedbackKind.ACCEPT:
        _endorse(b, profile, shown, weights)
        remembered = profile.find(shown.request_id)
        dwell = event.dwell_s if event.dwell_s is not None else (remembered.dwell_s if remembered else None)
        b.target(shown.prompt, shown.text, weights.accept_sft * weights.dwell_factor(dwell), "accept")
    elif k is FeedbackKind.RATING and event.rating is not None:
        _rated(b, profile, event, event.rating, weights)
    elif k is FeedbackKind.THUMBS and event.thumbs_up is not None:
        _rated(b, profile, event, 1.0 if event.thumbs_up else 0.0, weights)
    return TrainingSignals(tuple(b.pairs), tuple(b.sft))


def ingest(profile: UserProfile, event: FeedbackEvent, weights: SignalWeights,
           cfg: ProfileConfig) -> tuple[UserProfile, TrainingSignals]:
    """Extract the event's signals, then fold it into the profile (the order the rules assume)."""
    signals = extract_signals(profile, event, weights)
    return fold_feedback(profile, event, cfg, signals_emitted=len(signals)), signals
