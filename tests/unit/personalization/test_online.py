"""The per-event personalisation rule the agent runs: gating, versions, rollbacks, bounded state."""

from __future__ import annotations

import json

import pytest

from core.personalization import ASLSConfig, ASLSStrategy, FeedbackEvent, FeedbackKind, ShownResponse
from core.personalization.online import AdapterRef, OnlineConfig, OnlinePersonalizer, UserState, rolled_back

EAGER = ASLSStrategy(ASLSConfig(base_batch=1.0, min_batch=0.5, agree_octaves=0.0, max_updates_per_hour=3600))


def regenerate_then_accept(user: str, i: int, t: float) -> list[FeedbackEvent]:
    prompt = f"prompt {i}"
    worse, better = ShownResponse(f"{i}a", prompt, f"short {i}"), ShownResponse(f"{i}b", prompt, f"longer answer {i}")
    return [FeedbackEvent(f"e{i}r", user, t, FeedbackKind.REGENERATE, worse),
            FeedbackEvent(f"e{i}a", user, t + 1, FeedbackKind.ACCEPT, better, dwell_s=20.0)]


def run(personalizer: OnlinePersonalizer, user: UserState, events: list[FeedbackEvent]):
    plans = []
    for event in events:
        user, signals = personalizer.ingest(user, event)
        user, plan = personalizer.plan(user, event, signals, {p.seq: 0.0 for p in signals.pairs}, None)
        plans.append(plan)
        if plan.batch is not None:
            user = personalizer.committed(user, plan.batch, f"h{len(plans)}", f"/adapters/h{len(plans)}",
                                          event.event_time_s)
    return user, plans


def test_first_update_waits_for_min_events_then_commits_version_one():
    personalizer = OnlinePersonalizer(OnlineConfig(min_events=4), EAGER)
    user, plans = run(personalizer, UserState.new("u"), regenerate_then_accept("u", 0, 0.0))
    assert all(p.batch is None for p in plans) and user.current is None
    assert "waits for 4 feedback events" in plans[-1].reason
    user, plans = run(personalizer, user, regenerate_then_accept("u", 1, 100.0))
    assert plans[-1].batch is not None and len(plans[-1].batch.pairs) >= 1
    assert user.current is not None and user.current.version == 1 and user.last_version == 1
    assert user.strategy.last_trained_seq == plans[-1].batch.trained_upto_seq


def test_state_round_trips_through_json():
    personalizer = OnlinePersonalizer(OnlineConfig(min_events=1), EAGER)
    user, _ = run(personalizer, UserState.new("u"), regenerate_then_accept("u", 0, 0.0))
    assert user.current is not None
    assert UserState.from_json(json.loads(json.dumps(user.to_json()))) == user


def test_signals_are_bounded_and_oldest_dropped_first():
    personalizer = OnlinePersonalizer(OnlineConfig(min_events=1000, max_signals=5), EAGER)
    events = [e for i in range(6) for e in regenerate_then_accept("u", i, 10.0 * i)]
    user, _ = run(personalizer, UserState.new("u"), events)
    seqs = sorted([p.seq for p in user.pairs] + [s.seq for s in user.sft])
    assert len(seqs) == 5 and seqs[-1] == user.profile.next_seq - 1


def test_rollback_gets_a_new_version_and_never_reuses_one():
    user = UserState.new("u")
    user = rolled_back(user, AdapterRef(1, "h1", "/a/h1"))
    assert user.current == AdapterRef(1, "h1", "/a/h1") and user.last_version == 1
    user = rolled_back(user, None)
    assert user.current is None and user.last_version == 2


def test_feedback_of_another_user_is_refused():
    with pytest.raises(ValueError, match="given to the state"):
        OnlinePersonalizer().ingest(UserState.new("u"), regenerate_then_accept("v", 0, 0.0)[0])
