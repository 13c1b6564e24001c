"""One user's online personalisation, event by event: the pure half of the personalisation agent.

The agent keeps a :class:`UserState` per user in Postgres and, for each Feedback event, calls

1. :meth:`OnlinePersonalizer.ingest` -- signals extracted and the profile folded;
2. (impure, in the agent) the serving adapter's margins on the new preference pairs;
3. :meth:`OnlinePersonalizer.plan` -- the strategy observes the event, decides, and when it says
   "update" picks the training batch (pending signals plus replay);
4. (impure) the adapter trainer runs the update and stores the adapter;
5. :meth:`OnlinePersonalizer.committed` -- the new adapter becomes the user's current one.

Invariants: ``UserState`` round-trips through JSON exactly; at most ``max_signals`` signals are
kept per user (the oldest dropped first: they are the least likely replay picks anyway, see
``core.personalization.replay``); a user's first update waits for ``min_events`` feedback events,
so one stray click never trains an adapter; the version counter only grows, so a version number
names one adapter for ever (a rollback is a new version pointing at an earlier hash).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from core.personalization.profile import FeedbackEvent, ProfileConfig, UserProfile
from core.personalization.replay import TrainingBatch, select_training_batch
from core.personalization.signals import PreferencePair, SftTarget, SignalWeights, TrainingSignals, ingest
from core.personalization.strategy import (
    ASLSStrategy,
    StrategyState,
    UpdateDecision,
    UpdatePolicy,
    observations_for,
)


@dataclass(frozen=True)
class AdapterRef:
    """One version of a user's adapter: its content hash and where its files are."""

    version: int
    adapter_hash: str
    uri: str


@dataclass(frozen=True)
class UserState:
    user_id: str
    profile: UserProfile
    strategy: StrategyState = field(default_factory=StrategyState)
    pairs: tuple[PreferencePair, ...] = ()
    sft: tuple[SftTarget, ...] = ()
    current: AdapterRef | None = None
    """The adapter now announced for this user (None: the base model)."""
    last_version: int = 0
    """Highest version ever announced for this user (rollbacks included)."""

    @classmethod
    def new(cls, user_id: str) -> UserState:
        return cls(user_id=user_id, profile=UserProfile(user_id))

    def to_json(self) -> dict[str, Any]:
        return {
            "user_id": self.user_id,
            "profile": self.profile.to_json(),
            "strategy": self.strategy.to_json(),
            "pairs": [p.to_json() for p in self.pairs],
            "sft": [s.to_json() for s in self.sft],
            "current": None if self.current is None else
            {"version": self.current.version, "adapter_hash": self.current.adapter_hash, "uri": self.current.uri},
            "last_version": self.last_version,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> UserState:
        current = data.get("current")
        return cls(
            user_id=str(data["user_id"]),
            profile=UserProfile.from_json(data["profile"]),
            strategy=StrategyState.from_json(data["strategy"]),
            pairs=tuple(PreferencePair.from_json(p) for p in data.get("pairs", ())),
            sft=tuple(SftTarget.from_json(s) for s in data.get("sft", ())),
            current=None if current is None else AdapterRef(int(current["version"]), str(current["adapter_hash"]),
                                                            str(current["uri"])),
            last_version=int(data.get("last_version", 0)),
        )


@dataclass(frozen=True)
class UpdatePlan:
    """What the strategy decided for one event, and the batch to train on when it updates."""

    decision: UpdateDecision
    batch: TrainingBatch | None
    """None when there is no update (``decision.update`` is False or the gate held it back)."""
    reason: str


@dataclass(frozen=True)
class OnlineConfig:
    min_events: int = 8
    """Feedback events before a user's first update."""
    max_signals: int = 512
    """Training signals kept per user (pairs and SFT targets together)."""
    weights: SignalWeights = field(default_factory=SignalWeights)
    profile: ProfileConfig = field(default_factory=ProfileConfig)

    def __post_init__(self) -> None:
        if self.min_events < 1 or self.max_signals < 1:
            raise ValueError(f"need min_events >= 1 and max_signals >= 1, got {self.min_events}, "
                             f"{self.max_signals}")


class OnlinePersonalizer:
    """The per-event rule; stateless itself (all state is in :class:`UserState`)."""

    def __init__(self, config: OnlineConfig | None = None, policy: UpdatePolicy | None = None) -> None:
        self.config = config or OnlineConfig()
        self.policy: UpdatePolicy = policy or ASLSStrategy()

    def ingest(self, user: UserState, event: FeedbackEvent) -> tuple[UserState, TrainingSignals]:
        """Fold the event into the profile and keep the signals it yields."""
        if event.user_id != user.user_id:
            raise ValueError(f"feedback of {event.user_id!r} given to the state of {user.user_id!r}")
        profile, signals = ingest(user.profile, event, self.config.weights, self.config.profile)
        pairs = list(user.pairs) + list(signals.pairs)
        sft = list(user.sft) + list(signals.sft)
        overflow = len(pairs) + len(sft) - self.config.max_signals
        if overflow > 0:  # drop the oldest signals, whichever kind they are
            cutoff = sorted([p.seq for p in pairs] + [s.seq for s in sft])[overflow - 1]
            pairs = [p for p in pairs if p.seq > cutoff]
            sft = [s for s in sft if s.seq > cutoff]
        return replace(user, profile=profile, pairs=tuple(pairs), sft=tuple(sft)), signals

    def plan(self, user: UserState, event: FeedbackEvent, signals: TrainingSignals,
             margins: Mapping[int, float], produced_with_adapter: str | None) -> tuple[UserState, UpdatePlan]:
        """Let the strategy observe the event and decide; pick the batch if it updates.

        ``margins[seq]`` is the current adapter's margin on each new pair (chosen minus rejected
        score); ``produced_with_adapter`` is the adapter hash the rated response was generated
        with (InferenceResponse.adapter_version), so only a verdict on the current adapter's own
        output counts as evidence about it.
        """
        current_hash = user.current.adapter_hash if user.current else None
        observations = observations_for(
            event, signals, margins,
            produced_by_current_adapter=(produced_with_adapter or None) == current_hash)
        now = event.event_time_s
        strategy = self.policy.observe(user.strategy, now, observations)
        user = replace(user, strategy=strategy)
        decision = self.policy.decide(strategy, now)
        if not decision.update:
            return user, UpdatePlan(decision, None, decision.reason)
        if user.current is None and user.profile.n_events < self.config.min_events:
            return user, UpdatePlan(decision, None,
                                    f"first update waits for {self.config.min_events} feedback events "
                                    f"({user.profile.n_events} so far)")
        seed = int.from_bytes(hashlib.sha256(f"{user.user_id}:{event.event_id}".encode()).digest()[:4], "big")
        batch = select_training_batch(user.pairs, user.sft, last_trained_seq=strategy.last_trained_seq,
                                      replay_fraction=decision.replay_fraction, now_s=now, seed=seed)
        if len(batch) == 0:
            return user, UpdatePlan(decision, None, "no signals to train on")
        return user, UpdatePlan(decision, batch, decision.reason)

    def committed(self, user: UserState, batch: TrainingBatch, adapter_hash: str, uri: str,
                  now_s: float) -> UserState:
        """The state once the update's adapter is stored: it is the user's current adapter."""
        version = user.last_version + 1
        return replace(user, strategy=self.policy.committed(user.strategy, now_s, batch.trained_upto_seq),
                       current=AdapterRef(version, adapter_hash, uri), last_version=version)


def rolled_back(user: UserState, to: AdapterRef | None) -> UserState:
    """The state after an operator rolls the user back to an earlier adapter (None: the base model).

    The rollback gets a fresh version number; training continues warm-started from ``to``.
    """
    version = user.last_version + 1
    current = None if to is None else AdapterRef(version, to.adapter_hash, to.uri)
    return replace(user, current=current, last_version=version)
