from __future__ import annotations

import json
from typing import Any

import pytest

from core.personalization import (
    FeedbackKind,
    ProfileConfig,
    UserProfile,
    feedback_event_from_record,
    fold_feedback,
)
from tests.unit.personalization.helpers import event, shown

CFG = ProfileConfig(max_memory=4)


def test_fold_counts_kinds_and_remembers_what_the_user_did() -> None:
    p = UserProfile("u1")
    a = shown("q", "first answer")
    p = fold_feedback(p, event(FeedbackKind.RATING, a, 10.0, rating=0.25), CFG)
    p = fold_feedback(p, event(FeedbackKind.REGENERATE, a, 11.0), CFG)
    b = shown("q", "second answer")
    p = fold_feedback(p, event(FeedbackKind.ACCEPT, b, 12.0, dwell_s=8.0), CFG)
    assert p.n_events == 3
    assert p.counts == {"rating": 1, "regenerate": 1, "accept": 1}
    mem_a, mem_b = p.find(a.request_id), p.find(b.request_id)
    assert mem_a is not None and mem_a.score == 0.25 and mem_a.regenerated and not mem_a.accepted
    assert mem_b is not None and mem_b.accepted and mem_b.score == 1.0 and mem_b.dwell_s == 8.0
    assert p.rating_avg == 0.25 and p.dwell_avg_s == 8.0
    assert (p.first_time_s, p.last_time_s) == (10.0, 12.0)


def test_memory_is_bounded_and_keeps_the_newest() -> None:
    p = UserProfile("u1")
    responses = [shown(f"q{i}", f"a{i}") for i in range(6)]
    for i, r in enumerate(responses):
        p = fold_feedback(p, event(FeedbackKind.RATING, r, float(i), rating=0.5), CFG)
    assert [m.request_id for m in p.memory] == [r.request_id for r in responses[-4:]]


def test_rate_grows_with_denser_feedback_and_decays_when_idle() -> None:
    def profile_with(interval: float) -> UserProfile:
        p = UserProfile("u1")
        for i in range(20):
            p = fold_feedback(p, event(FeedbackKind.ACCEPT, shown("q", f"a{i}"), i * interval), CFG)
        return p

    busy, quiet = profile_with(10.0), profile_with(300.0)
    assert busy.events_per_hour(CFG) > 3 * quiet.events_per_hour(CFG)
    assert busy.events_per_hour(CFG, now_s=busy.last_time_s + 7200) < busy.events_per_hour(CFG) / 4  # type: ignore[operator]


def test_json_round_trip_is_exact() -> None:
    p = UserProfile("u1")
    p = fold_feedback(p, event(FeedbackKind.RATING, shown("q", "x"), 1.0, rating=0.75), CFG)
    p = fold_feedback(p, event(FeedbackKind.DWELL, shown("q", "y"), 2.0, dwell_s=3.0), CFG, signals_emitted=2)
    restored = UserProfile.from_json(json.loads(json.dumps(p.to_json())))
    assert restored == p
    assert restored.next_seq == 2


def test_folding_another_users_event_is_refused() -> None:
    with pytest.raises(ValueError, match="u2"):
        fold_feedback(UserProfile("u1"), event(FeedbackKind.ACCEPT, shown("q", "x"), 0.0, user="u2"), CFG)


@pytest.mark.parametrize(("kind", "fields"), [
    (FeedbackKind.RATING, {"rating": 1.5}),
    (FeedbackKind.RATING, {}),
    (FeedbackKind.PAIRWISE, {"winner": "a"}),
    (FeedbackKind.EDIT, {"edited_text": ""}),
    (FeedbackKind.DWELL, {}),
])
def test_invalid_events_are_rejected(kind: FeedbackKind, fields: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        event(kind, shown("q", "x"), 0.0, **fields)


def test_record_mapping_follows_the_feedback_contract() -> None:
    responses = {"r1": shown("q", "one", "r1"), "r2": shown("q", "two", "r2")}
    base = {"event_id": "e", "user_id": "u1", "event_time": 5_000, "request_id": "r1"}
    pair = feedback_event_from_record(
        {**base, "kind": "pairwise", "pairwise": {"request_id_a": "r1", "model_a": "m", "request_id_b": "r2",
                                                  "model_b": "m", "winner": "b"}}, responses.get)
    assert pair is not None and pair.kind is FeedbackKind.PAIRWISE and pair.winner == "b"
    assert pair.other == responses["r2"] and pair.event_time_s == 5.0
    edit = feedback_event_from_record(
        {**base, "kind": "implicit",
         "implicit": {"signal": "edit", "edited_text": "better", "dwell_ms": 1500}},
        responses.get)
    assert edit is not None and edit.kind is FeedbackKind.EDIT and edit.edited_text == "better"
    assert edit.dwell_s == 1.5
    rating = feedback_event_from_record({**base, "kind": "rating", "rating": 0.5}, responses.get)
    assert rating is not None and rating.rating == 0.5
    assert feedback_event_from_record({**base, "request_id": "unknown", "kind": "rating", "rating": 0.5},
                                      responses.get) is None
