"""The ASLS rule's decisions on scripted feedback sequences."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Sequence
from dataclasses import replace

import pytest

from core.personalization import (
    ASLSConfig,
    ASLSStrategy,
    FeedbackKind,
    FixedSchedule,
    FixedScheduleConfig,
    Observation,
    StrategyState,
    TrainingSignals,
    UpdateDecision,
    UpdatePolicy,
    agreement_of,
    observations_for,
)
from core.personalization.signals import PreferencePair
from tests.unit.personalization.helpers import event, shown

RULE = ASLSConfig(base_batch=4.0, fast_half_life=4.0, slow_half_life=24.0)
"""Pinned here so the scripted expectations do not move when the defaults are retuned."""

Script = Callable[[int], Sequence[tuple[float, float | None]]]
"""event index -> [(signal weight, agreement or None)] for that event."""


def replay_script(policy: UpdatePolicy, n_events: int, interval_s: float, script: Script,
                  ) -> tuple[StrategyState, list[tuple[int, UpdateDecision]]]:
    state, seq = StrategyState(), itertools.count()
    updates = []
    for i in range(n_events):
        t = i * interval_s
        obs = [Observation(w, a, next(seq)) for w, a in script(i)]
        state = policy.observe(state, t, obs)
        decision = policy.decide(state, t)
        if decision.update:
            updates.append((i, decision))
            state = policy.committed(state, t, trained_upto_seq=next(seq) - 1)
    return state, updates


def constant(agreement: float | None) -> Script:
    return lambda i: [(1.0, agreement)]


def test_an_agreeing_user_is_updated_less_often_and_more_gently() -> None:
    policy = ASLSStrategy(RULE)
    _, agreeing = replay_script(policy, 60, 60.0, constant(1.0))
    _, disagreeing = replay_script(policy, 60, 60.0, constant(0.0))
    _, neutral = replay_script(policy, 60, 60.0, constant(None))
    assert 0 < len(agreeing) < len(neutral) < len(disagreeing)
    assert len(disagreeing) >= 4 * len(agreeing)
    assert agreeing[-1][1].lr < neutral[-1][1].lr < disagreeing[-1][1].lr


def test_after_drift_updates_come_sooner_with_higher_lr_and_less_replay() -> None:
    def drifting(i: int) -> list[tuple[float, float | None]]:
        return [(1.0, 1.0 if i < 40 else 0.0)]

    policy = ASLSStrategy(RULE)
    _, updates = replay_script(policy, 50, 60.0, drifting)
    _, steady = replay_script(policy, 50, 60.0, constant(1.0))
    before = [d for i, d in updates if i < 40]
    after = [(i, d) for i, d in updates if i >= 40]
    assert after[0][0] <= 41  # reacts at once to the first disagreements
    assert len(after) >= 4 > 1 >= len([i for i, _ in steady if i >= 40])
    settled = after[1][1]
    assert settled.drift > 0.3
    assert settled.lr > 2 * max(d.lr for d in before)
    assert settled.replay_fraction == pytest.approx(policy.config.replay_min)
    assert settled.replay_fraction < min(d.replay_fraction for d in before)


def test_the_drift_terms_are_what_speeds_adaptation() -> None:
    def drifting(i: int) -> list[tuple[float, float | None]]:
        return [(1.0, 1.0 if i < 40 else 0.0)]

    with_drift = ASLSStrategy(RULE)
    without = ASLSStrategy(replace(RULE, drift_gain=0.0, drift_lr_gain=0.0, replay_min=0.5))
    s1, _ = replay_script(with_drift, 43, 60.0, drifting)
    s2, _ = replay_script(without, 43, 60.0, drifting)
    d1, d2 = with_drift.decide(s1, 43 * 60.0), without.decide(s2, 43 * 60.0)
    assert d1.threshold < d2.threshold
    # same agreement and evidence; only the drift terms differ
    assert d1.agreement == pytest.approx(d2.agreement)
    lr1 = with_drift.config.base_lr * (1.5 - d1.agreement) * (1 + with_drift.config.drift_lr_gain * d1.drift)
    assert lr1 > with_drift.config.base_lr * (1.5 - d1.agreement)


def test_a_busy_user_gets_bigger_batches_and_at_most_the_hourly_update_budget() -> None:
    policy = ASLSStrategy(replace(RULE, max_updates_per_hour=30.0))
    _, busy = replay_script(policy, 200, 5.0, constant(None))  # 720 signals per hour
    _, calm = replay_script(policy, 200, 600.0, constant(None))  # 6 signals per hour
    assert len(busy) < len(calm) / 3
    assert busy[-1][1].threshold > 4 * calm[-1][1].threshold
    hours = 200 * 5.0 / 3600
    assert len(busy) <= 30 * hours + 1


def test_a_sparse_agreeing_user_is_still_updated_after_max_wait() -> None:
    policy = ASLSStrategy(replace(RULE, max_wait_s=1800.0))
    _, updates = replay_script(policy, 6, 1200.0, constant(1.0))
    assert updates
    assert "waited" in updates[0][1].reason
    assert updates[0][1].pending_weight < updates[0][1].threshold


def test_no_update_below_min_batch_and_steps_follow_the_batch() -> None:
    policy = ASLSStrategy(RULE)
    state = policy.observe(StrategyState(), 0.0, [Observation(1.0, 0.0, 0)])
    assert not policy.decide(state, 1e6).update  # 1.0 < min_batch even after waiting long
    big = policy.observe(state, 1.0, [Observation(1.0, 0.0, i) for i in range(1, 40)])
    decision = policy.decide(big, 1.0)
    assert decision.update and decision.steps == policy.config.max_steps
    small = policy.observe(StrategyState(), 0.0, [Observation(1.0, 0.0, 0), Observation(1.0, 0.0, 1)])
    assert policy.decide(small, 0.0).steps == policy.config.min_steps


def test_committed_clears_pending_and_old_signals_are_not_pending_again() -> None:
    policy = ASLSStrategy(RULE)
    state = policy.observe(StrategyState(), 0.0, [Observation(1.0, 0.0, i) for i in range(5)])
    state = policy.committed(state, 0.0, trained_upto_seq=4)
    assert (state.pending_count, state.pending_weight) == (0, 0.0)
    assert (state.n_updates, state.last_trained_seq) == (1, 4)
    state = policy.observe(state, 1.0, [Observation(1.0, 0.0, 3)])
    assert state.pending_count == 0


def test_fixed_schedule_updates_every_k_events_whatever_the_agreement() -> None:
    policy = FixedSchedule(FixedScheduleConfig(every_k_events=5, lr=1e-3, steps=3))
    for agreement in (0.0, 1.0):
        _, updates = replay_script(policy, 30, 60.0, constant(agreement))
        assert [i for i, _ in updates] == [4, 9, 14, 19, 24, 29]
        assert {(d.lr, d.steps) for _, d in updates} == {(1e-3, 3)}


def test_state_round_trips_through_json() -> None:
    policy = ASLSStrategy(RULE)
    state, _ = replay_script(policy, 13, 30.0, constant(0.5))
    restored = StrategyState.from_json(json.loads(json.dumps(state.to_json())))
    assert restored == state
    assert policy.decide(restored, 400.0) == policy.decide(state, 400.0)


def test_agreement_and_observations_from_an_event() -> None:
    assert (agreement_of(0.3), agreement_of(-0.3), agreement_of(0.01, tolerance=0.05)) == (1.0, 0.0, 0.5)
    r = shown("q", "served")
    pair = PreferencePair("q", "other", "served", 0.7, "regenerate", "e", 1.0, seq=7)
    signals = TrainingSignals(pairs=(pair,))
    regen = event(FeedbackKind.REGENERATE, r, 1.0)
    obs = observations_for(regen, signals, {7: -0.2}, produced_by_current_adapter=True)
    assert obs == [Observation(0.7, 0.0, 7), Observation(0.5, 0.0, None)]
    rating = event(FeedbackKind.RATING, r, 2.0, rating=0.75)
    assert observations_for(rating, TrainingSignals(), {}, produced_by_current_adapter=True) == [
        Observation(0.5, 0.75, None)]
    assert observations_for(rating, TrainingSignals(), {}, produced_by_current_adapter=False) == []


@pytest.mark.parametrize("bad", [
    {"min_lr": 1.0},
    {"min_batch": 30.0},
    {"replay_max": 1.0},
    {"fast_half_life": 30.0},
    {"max_wait_s": 0.0},
    {"drift_gain": -1.0},
])
def test_config_validation_names_the_values(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        ASLSConfig(**bad)  # type: ignore[arg-type]
