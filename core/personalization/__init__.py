"""ASLS personalisation, made concrete: user profiles, training signals and the adaptive update rule.

The ASLS paper (arXiv 2409.16973) names two layers, a user profile and online adaptation from
self-supervised signals, but specifies neither. This package is our instance of both:

* :mod:`.profile`  folds feedback events (ratings, thumbs, pairwise preferences, regenerate, edit,
  accept, dwell) into a bounded, JSON-serialisable :class:`UserProfile`;
* :mod:`.signals`  turns each event, read against the profile, into weighted training signals:
  preference pairs (chosen vs rejected response) and SFT targets (accepted or edited responses);
* :mod:`.strategy` decides per user *when* and *how much* to update the user's LoRA adapter
  (update threshold, learning rate, steps, replay mix) from the feedback rate, the adapter's
  agreement with new preferences and drift; :class:`FixedSchedule` is the non-adaptive baseline;
* :mod:`.replay`   picks the training batch: every pending signal plus a recency-weighted replay
  sample of older ones.

Everything is pure: frozen configs and explicit JSON-serialisable state in, decisions out. The
personalisation agent stores the state in Postgres and calls these functions per feedback event.
The rule and its parameters are documented in ``docs/PERSONALIZATION.md``.
"""

from core.personalization.profile import (
    FeedbackEvent,
    FeedbackKind,
    ProfileConfig,
    ShownResponse,
    UserProfile,
    feedback_event_from_record,
    fold_feedback,
)
from core.personalization.replay import TrainingBatch, select_training_batch
from core.personalization.signals import (
    PreferencePair,
    SftTarget,
    SignalWeights,
    TrainingSignals,
    extract_signals,
    ingest,
)
from core.personalization.strategy import (
    ASLSConfig,
    ASLSStrategy,
    FixedSchedule,
    FixedScheduleConfig,
    Observation,
    StrategyState,
    UpdateDecision,
    UpdatePolicy,
    agreement_of,
    observations_for,
    outcome_agreement,
)

__all__ = [
    "ASLSConfig",
    "ASLSStrategy",
    "FeedbackEvent",
    "FeedbackKind",
    "FixedSchedule",
    "FixedScheduleConfig",
    "Observation",
    "PreferencePair",
    "ProfileConfig",
    "SftTarget",
    "ShownResponse",
    "SignalWeights",
    "StrategyState",
    "TrainingBatch",
    "TrainingSignals",
    "UpdateDecision",
    "UpdatePolicy",
    "UserProfile",
    "agreement_of",
    "extract_signals",
    "feedback_event_from_record",
    "fold_feedback",
    "ingest",
    "observations_for",
    "outcome_agreement",
    "select_training_batch",
]
