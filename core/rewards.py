"""Feedback -> scalar rewards for RLHF (the rewarder agent's rule), in [-1, 1].

One Feedback event can reward one or two responses:

* ``rating`` r in [0, 1]            -> 2r - 1 for the rated response
* ``thumbs``                        -> +1 (up) / -1 (down)
* ``pairwise`` (a vs b)             -> winner +1, loser -1; a tie gives 0 to both
* ``implicit`` accept               -> +0.5   (the user kept the answer)
* ``implicit`` edit                 -> -0.25  (kept, but had to fix it)
* ``implicit`` regenerate           -> -0.5   (asked for another answer)
* ``implicit`` dwell d ms           -> 0.25 * tanh(d / 30 s), a weak positive signal

Explicit signals are full-strength; implicit ones are weaker because they are noisier proxies
of satisfaction. The rule is a pure function of the feedback, so replaying the feedback topic
reproduces the rewards exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from core.errors import ValidationError

IMPLICIT_REWARD = {"accept": 0.5, "edit": -0.25, "regenerate": -0.5}
DWELL_SCALE_MS = 30_000.0
DWELL_WEIGHT = 0.25


@dataclass(frozen=True)
class RewardAssignment:
    request_id: str
    reward: float


def rewards_from_feedback(feedback: dict[str, Any]) -> list[RewardAssignment]:
    """Rewards implied by one Feedback event (see the module docstring for the rule)."""
    kind = feedback["kind"]
    rid = feedback["request_id"]
    if kind == "rating":
        rating = feedback.get("rating")
        if rating is None or not 0.0 <= rating <= 1.0 or math.isnan(rating):
            raise ValidationError(f"rating feedback needs a rating in [0, 1], got {rating!r}")
        return [RewardAssignment(rid, 2.0 * rating - 1.0)]
    if kind == "thumbs":
        if feedback.get("thumbs_up") is None:
            raise ValidationError("thumbs feedback without thumbs_up")
        return [RewardAssignment(rid, 1.0 if feedback["thumbs_up"] else -1.0)]
    if kind == "pairwise":
        pair = feedback.get("pairwise")
        if not pair:
            raise ValidationError("pairwise feedback without a pairwise preference")
        if pair["winner"] == "tie":
            return [RewardAssignment(pair["request_id_a"], 0.0), RewardAssignment(pair["request_id_b"], 0.0)]
        a_wins = pair["winner"] == "a"
        return [RewardAssignment(pair["request_id_a"], 1.0 if a_wins else -1.0),
                RewardAssignment(pair["request_id_b"], -1.0 if a_wins else 1.0)]
    if kind == "implicit":
        signal = feedback.get("implicit")
        if not signal:
            raise ValidationError("implicit feedback without a signal")
        if signal["signal"] == "dwell":
            dwell = signal.get("dwell_ms")
            if dwell is None or dwell < 0:
                raise ValidationError(f"dwell signal needs a non-negative dwell_ms, got {dwell!r}")
            return [RewardAssignment(rid, DWELL_WEIGHT * math.tanh(dwell / DWELL_SCALE_MS))]
        return [RewardAssignment(rid, IMPLICIT_REWARD[signal["signal"]])]
    raise ValidationError(f"unknown feedback kind {kind!r}")
