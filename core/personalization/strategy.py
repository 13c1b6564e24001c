"""The ASLS adaptive update rule: per user, when to update the adapter and how much.

Each feedback event becomes a few :class:`Observation` s. An observation may carry

* a training signal's weight (``signal_seq`` set): it adds to the user's *pending* evidence;
* an *agreement* value in [0, 1]: how well the adapter now serving the user predicted this
  user's preference. For a preference pair it is the sign of the adapter's margin (chosen over
  rejected, see :func:`agreement_of`); for the user's verdict on a response the current adapter
  produced it is the verdict itself (rating, thumbs, accept 1, regenerate 0; see
  :func:`outcome_agreement`).

The state keeps two decayed weighted means of agreement, ``fast`` (half-life ``fast_half_life``
observation weights) and ``slow`` (``slow_half_life``), each started from a neutral prior of 0.5,
and a decayed counter of signal weight for the feedback rate. From them:

    D     = 1 - fast                               disagreement now
    drift = max(0, slow - fast)                    recent agreement fell below the long-run level
    rate  = signal weight per hour (decayed counter)

    threshold T = base_batch * 2 ** (agree_octaves * (2 * fast - 1)) / (1 + drift_gain * drift)
                  raised to rate / max_updates_per_hour, clipped to [min_batch, max_batch]
    update   never within 3600 / max_updates_per_hour s of the last update; otherwise
             when pending >= T, or pending >= min_batch and the oldest pending signal waited
             max_wait_s (so sparse users are not left behind)
    lr       = clip(base_lr * (0.5 + D) * (1 + drift_lr_gain * drift), min_lr, max_lr)
    replay   = replay_max - (replay_max - replay_min) * min(1, drift / drift_full)
    steps    = clip(ceil(epochs * pending_count / (1 - replay) / pairs_per_step), min_steps, max_steps)

Why: an adapter that already predicts the user (high agreement) gains little from an update, so
it waits for 2**agree_octaves times more evidence; one that disagrees updates on less evidence
and with a larger step; drift (preferences moved) makes updates sooner and larger and replays
fewer old signals, which now describe a user who no longer exists. The rate floor bounds the
compute any single user can claim (at most ``max_updates_per_hour``), and bigger batches for busy
users also average their noise.

:class:`FixedSchedule` is the non-adaptive baseline: every k feedback events, fixed lr and steps.
Both implement :class:`UpdatePolicy`; state is a frozen, JSON-serialisable :class:`StrategyState`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, Protocol

from core.personalization.profile import FeedbackEvent, FeedbackKind, decayed_rate_per_hour
from core.personalization.signals import TrainingSignals

NEUTRAL = 0.5


@dataclass(frozen=True)
class Observation:
    weight: float
    agreement: float | None = None
    """In [0, 1]; ``None`` when the observation says nothing about the current adapter."""
    signal_seq: int | None = None
    """Sequence number of the training signal this observation stands for, if any."""

    def __post_init__(self) -> None:
        if not self.weight > 0.0 or math.isinf(self.weight):
            raise ValueError(f"observation weight must be finite and > 0, got {self.weight}")
        if self.agreement is not None and not 0.0 <= self.agreement <= 1.0:
            raise ValueError(f"agreement must be within [0, 1], got {self.agreement}")


def agreement_of(margin: float, tolerance: float = 0.0) -> float:
    """1 if the adapter prefers the chosen response by more than ``tolerance``, 0 if the rejected
    one, 0.5 inside the tolerance band (a fresh adapter on its reference is exactly indifferent)."""
    if margin > tolerance:
        return 1.0
    if margin < -tolerance:
        return 0.0
    return NEUTRAL


def outcome_agreement(event: FeedbackEvent) -> float | None:
    """The user's verdict on a response as agreement with the adapter that produced it."""
    k = event.kind
    if k is FeedbackKind.RATING:
        return event.rating
    if k is FeedbackKind.THUMBS:
        return 1.0 if event.thumbs_up else 0.0
    if k is FeedbackKind.ACCEPT:
        return 1.0
    if k is FeedbackKind.REGENERATE:
        return 0.0
    if k is FeedbackKind.EDIT:
        return NEUTRAL
    return None


@dataclass(frozen=True)
class StrategyState:
    fast_num: float = 0.0
    fast_den: float = 0.0
    slow_num: float = 0.0
    slow_den: float = 0.0
    pending_weight: float = 0.0
    pending_count: int = 0
    pending_since_s: float | None = None
    rate_acc: float = 0.0
    """Decayed signal-weight counter (time constant ``rate_half_life_s / ln 2``)."""
    first_time_s: float | None = None
    last_time_s: float | None = None
    last_update_s: float | None = None
    n_updates: int = 0
    events_since_update: int = 0
    last_trained_seq: int = -1
    """Signals with seq <= this have been trained on (they are replay candidates now)."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> StrategyState:
        return cls(**data)


@dataclass(frozen=True)
class UpdateDecision:
    update: bool
    reason: str
    lr: float = 0.0
    steps: int = 0
    replay_fraction: float = 0.0
    threshold: float = 0.0
    agreement: float = NEUTRAL
    drift: float = 0.0
    rate_per_hour: float = 0.0
    pending_weight: float = 0.0


class UpdatePolicy(Protocol):
    name: str

    def observe(
        self, state: StrategyState, time_s: float, observations: Sequence[Observation]
    ) -> StrategyState:
        """Fold one feedback event's observations (possibly none) into the state."""
        ...

    def decide(self, state: StrategyState, now_s: float) -> UpdateDecision: ...

    def committed(self, state: StrategyState, now_s: float, trained_upto_seq: int) -> StrategyState:
        """The state after an update that trained on every signal up to ``trained_upto_seq``."""
        ...


def _decayed_mean(num: float, den: float, prior_weight: float) -> float:
    return (num + prior_weight * NEUTRAL) / (den + prior_weight)


def _observe_common(state: StrategyState, time_s: float, observations: Sequence[Observation], *,
                    fast_hl: float, slow_hl: float, rate_tau_s: float) -> StrategyState:
    fast_num, fast_den, slow_num, slow_den = state.fast_num, state.fast_den, state.slow_num, state.slow_den
    pending_w, pending_n, since = state.pending_weight, state.pending_count, state.pending_since_s
    rate_acc = state.rate_acc
    if state.last_time_s is not None:
        rate_acc *= math.exp(-max(0.0, time_s - state.last_time_s) / rate_tau_s)
    for obs in observations:
        if obs.agreement is not None:
            w = min(obs.weight, 1.0)
            df, ds = 0.5 ** (w / fast_hl), 0.5 ** (w / slow_hl)
            fast_num, fast_den = fast_num * df + w * obs.agreement, fast_den * df + w
            slow_num, slow_den = slow_num * ds + w * obs.agreement, slow_den * ds + w
        if obs.signal_seq is not None and obs.signal_seq > state.last_trained_seq:
            pending_w += obs.weight
            pending_n += 1
            rate_acc += obs.weight
            since = time_s if since is None else since
    return replace(state, fast_num=fast_num, fast_den=fast_den, slow_num=slow_num, slow_den=slow_den,
                   pending_weight=pending_w, pending_count=pending_n, pending_since_s=since,
                   rate_acc=rate_acc, events_since_update=state.events_since_update + 1,
                   first_time_s=time_s if state.first_time_s is None else state.first_time_s,
                   last_time_s=time_s if state.last_time_s is None else max(time_s, state.last_time_s))


def _committed(state: StrategyState, now_s: float, trained_upto_seq: int) -> StrategyState:
    return replace(state, pending_weight=0.0, pending_count=0, pending_since_s=None, last_update_s=now_s,
                   n_updates=state.n_updates + 1, events_since_update=0,
                   last_trained_seq=max(state.last_trained_seq, trained_upto_seq))


@dataclass(frozen=True)
class ASLSConfig:
    base_lr: float = 1e-2
    """Learning rate at neutral agreement and no drift (LoRA on two layers, AdamW, few steps)."""
    min_lr: float = 1.5e-3
    max_lr: float = 3e-2
    drift_lr_gain: float = 2.0
    """lr multiplier is (1 + drift_lr_gain * drift)."""
    base_batch: float = 12.0
    """Pending signal weight that triggers an update at neutral agreement (0.5)."""
    agree_octaves: float = 3.0
    """Full agreement multiplies the threshold by 2**agree_octaves; full disagreement divides it."""
    drift_gain: float = 4.0
    """Drift divides the threshold by (1 + drift_gain * drift)."""
    min_batch: float = 1.5
    """Never update on less pending weight than this."""
    max_batch: float = 24.0
    max_updates_per_hour: float = 30.0
    """Compute budget per user: updates are at least 3600 / this seconds apart, and the threshold
    is at least (signal weight per hour) / this, so a busy user gets bigger batches, not more."""
    max_wait_s: float = 1800.0
    """Update anyway (if pending >= min_batch) once the oldest pending signal is this old."""
    fast_half_life: float = 6.0
    """Half-life of the recent agreement mean, in observation weight."""
    slow_half_life: float = 30.0
    prior_weight: float = 0.5
    """Weight of the neutral 0.5 prior in both agreement means."""
    rate_half_life_s: float = 1800.0
    rate_min_window_s: float = 600.0
    """A new user's rate is measured over at least this long."""
    replay_min: float = 0.1
    replay_max: float = 0.5
    drift_full: float = 0.3
    """Drift at which replay falls to ``replay_min``."""
    epochs: float = 2.0
    """Passes over the update's batch (pending + replay)."""
    pairs_per_step: int = 8
    """Signals per optimiser step; must match the trainer's batch size."""
    min_steps: int = 4
    max_steps: int = 12

    def __post_init__(self) -> None:
        if not 0 < self.min_lr <= self.base_lr <= self.max_lr:
            raise ValueError(f"need 0 < min_lr <= base_lr <= max_lr, got {self.min_lr}, {self.base_lr}, "
                             f"{self.max_lr}")
        if not 0 < self.min_batch <= self.base_batch <= self.max_batch:
            raise ValueError(f"need 0 < min_batch <= base_batch <= max_batch, got {self.min_batch}, "
                             f"{self.base_batch}, {self.max_batch}")
        if not 0.0 <= self.replay_min <= self.replay_max < 1.0:
            raise ValueError(f"need 0 <= replay_min <= replay_max < 1, got {self.replay_min}, "
                             f"{self.replay_max}")
        if not 0 < self.fast_half_life < self.slow_half_life:
            raise ValueError(f"need 0 < fast_half_life < slow_half_life, got {self.fast_half_life}, "
                             f"{self.slow_half_life}")
        if not 1 <= self.min_steps <= self.max_steps or self.pairs_per_step < 1:
            raise ValueError(f"need 1 <= min_steps <= max_steps and pairs_per_step >= 1, got "
                             f"{self.min_steps}, {self.max_steps}, {self.pairs_per_step}")
        for name in ("max_updates_per_hour", "max_wait_s", "rate_half_life_s", "rate_min_window_s",
                     "drift_full", "epochs", "prior_weight"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.drift_gain < 0 or self.drift_lr_gain < 0 or self.agree_octaves < 0:
            raise ValueError(f"gains must be >= 0, got drift_gain={self.drift_gain}, "
                             f"drift_lr_gain={self.drift_lr_gain}, agree_octaves={self.agree_octaves}")


class ASLSStrategy:
    """The adaptive rule (see the module docstring); pure: state in, state or decision out."""

    name = "asls"

    def __init__(self, config: ASLSConfig | None = None) -> None:
        self.config = config or ASLSConfig()

    @property
    def _rate_tau_s(self) -> float:
        return self.config.rate_half_life_s / math.log(2)

    def agreement(self, state: StrategyState) -> tuple[float, float]:
        """(fast, slow) agreement means."""
        c = self.config
        return (_decayed_mean(state.fast_num, state.fast_den, c.prior_weight),
                _decayed_mean(state.slow_num, state.slow_den, c.prior_weight))

    def rate_per_hour(self, state: StrategyState, now_s: float) -> float:
        if state.last_time_s is None or state.first_time_s is None:
            return 0.0
        return decayed_rate_per_hour(state.rate_acc, first_s=state.first_time_s, last_s=state.last_time_s,
                                     now_s=now_s, half_life_s=self.config.rate_half_life_s,
                                     min_window_s=self.config.rate_min_window_s)

    def observe(
        self, state: StrategyState, time_s: float, observations: Sequence[Observation]
    ) -> StrategyState:
        c = self.config
        return _observe_common(state, time_s, observations, fast_hl=c.fast_half_life,
                               slow_hl=c.slow_half_life, rate_tau_s=self._rate_tau_s)

    def decide(self, state: StrategyState, now_s: float) -> UpdateDecision:
        c = self.config
        fast, slow = self.agreement(state)
        drift = max(0.0, slow - fast)
        rate = self.rate_per_hour(state, now_s)
        threshold = c.base_batch * 2.0 ** (c.agree_octaves * (2.0 * fast - 1.0))
        threshold /= 1.0 + c.drift_gain * drift
        threshold = min(c.max_batch, max(c.min_batch, threshold, rate / c.max_updates_per_hour))
        pending = state.pending_weight
        common: dict[str, Any] = {"threshold": threshold, "agreement": fast, "drift": drift,
                                  "rate_per_hour": rate, "pending_weight": pending}
        if pending < c.min_batch or state.pending_count == 0:
            return UpdateDecision(False, "too little pending evidence", **common)
        waited = now_s - state.pending_since_s if state.pending_since_s is not None else 0.0
        cooldown = 3600.0 / c.max_updates_per_hour
        if state.last_update_s is not None and now_s - state.last_update_s < cooldown:
            return UpdateDecision(False, f"cooldown: at most {c.max_updates_per_hour:g} updates per hour",
                                  **common)
        if pending >= threshold:
            reason = "pending evidence reached the threshold"
        elif waited >= c.max_wait_s:
            reason = f"oldest pending signal waited {waited:.0f}s"
        else:
            return UpdateDecision(False, "below threshold", **common)
        lr = c.base_lr * (0.5 + (1.0 - fast)) * (1.0 + c.drift_lr_gain * drift)
        lr = min(c.max_lr, max(c.min_lr, lr))
        replay = c.replay_max - (c.replay_max - c.replay_min) * min(1.0, drift / c.drift_full)
        batch = state.pending_count / (1.0 - replay)
        steps = math.ceil(c.epochs * batch / c.pairs_per_step)
        steps = min(c.max_steps, max(c.min_steps, steps))
        return UpdateDecision(True, reason, lr=lr, steps=steps, replay_fraction=replay, **common)

    def committed(self, state: StrategyState, now_s: float, trained_upto_seq: int) -> StrategyState:
        return _committed(state, now_s, trained_upto_seq)


@dataclass(frozen=True)
class FixedScheduleConfig:
    every_k_events: int = 10
    """Update after every k feedback events (when anything is pending)."""
    lr: float = 1e-2
    steps: int = 6
    replay_fraction: float = 0.3

    def __post_init__(self) -> None:
        if self.every_k_events < 1 or self.steps < 1 or self.lr <= 0:
            raise ValueError(f"need every_k_events >= 1, steps >= 1, lr > 0; got {self.every_k_events}, "
                             f"{self.steps}, {self.lr}")
        if not 0.0 <= self.replay_fraction < 1.0:
            raise ValueError(f"replay_fraction must be within [0, 1), got {self.replay_fraction}")


class FixedSchedule:
    """Baseline: update every k events with a fixed learning rate, step count and replay mix."""

    name = "fixed_schedule"

    def __init__(self, config: FixedScheduleConfig | None = None) -> None:
        self.config = config or FixedScheduleConfig()

    def observe(
        self, state: StrategyState, time_s: float, observations: Sequence[Observation]
    ) -> StrategyState:
        # Agreement is tracked for reporting only; it never changes this policy's decisions.
        return _observe_common(state, time_s, observations, fast_hl=4.0, slow_hl=24.0,
                               rate_tau_s=1800.0 / math.log(2))

    def decide(self, state: StrategyState, now_s: float) -> UpdateDecision:
        c = self.config
        if state.events_since_update < c.every_k_events or state.pending_count == 0:
            return UpdateDecision(False, f"{state.events_since_update}/{c.every_k_events} events",
                                  pending_weight=state.pending_weight)
        return UpdateDecision(True, f"every {c.every_k_events} events", lr=c.lr, steps=c.steps,
                              replay_fraction=c.replay_fraction, pending_weight=state.pending_weight)

    def committed(self, state: StrategyState, now_s: float, trained_upto_seq: int) -> StrategyState:
        return _committed(state, now_s, trained_upto_seq)


def observations_for(
    event: FeedbackEvent,
    signals: TrainingSignals,
    margins: Mapping[int, float],
    *,
    produced_by_current_adapter: bool,
    outcome_weight: float = 0.5,
    tolerance: float = 0.0,
) -> list[Observation]:
    """The observations one feedback event contributes.

    ``margins[seq]`` is the serving adapter's margin (score of chosen minus score of rejected,
    the score the engine ranks by) for each pair the event produced; pairs without a margin only
    add pending weight. ``produced_by_current_adapter`` says whether ``event.response`` was
    generated with the adapter now in service (InferenceResponse.adapter_version); only then is
    the user's verdict on it evidence about that adapter, weighted ``outcome_weight``.
    """
    out: list[Observation] = []
    for pair in signals.pairs:
        margin = margins.get(pair.seq)
        agreement = agreement_of(margin, tolerance) if margin is not None else None
        out.append(Observation(pair.weight, agreement, pair.seq))
    out.extend(Observation(t.weight, None, t.seq) for t in signals.sft)
    if produced_by_current_adapter:
        verdict = outcome_agreement(event)
        if verdict is not None:
            out.append(Observation(outcome_weight, verdict, None))
    return out
