"""The dashboard's and demo's counters count what happened during this run, not the topics' history."""

from __future__ import annotations

from flywheel.gateway.stats import CURVE_POINTS, CURVE_WINDOW, ServiceStats


def adapter(event_time_ms: int, version: int) -> dict:
    return {"event_time": event_time_ms, "user_id": "u", "adapter_hash": "a" * 64, "version": version,
            "rollback": False}


def test_state_events_before_the_run_set_state_but_are_not_counted():
    stats = ServiceStats(started_at=1000.0)
    stats.on_adapter(adapter(999_000, 1))
    stats.on_model({"event_time": 999_000, "model": "m", "version": "v1", "step": 1})
    assert stats.adapters_published == 0 and stats.trainer_steps == 0
    assert stats.adapters["u"]["version"] == 1 and stats.models["m"]["version"] == "v1"
    stats.on_adapter(adapter(1_000_500, 2))
    stats.on_model({"event_time": 1_000_500, "model": "m", "version": "v2", "step": 2})
    assert stats.adapters_published == 1 and stats.trainer_steps == 1
    assert stats.adapters["u"]["version"] == 2 and stats.models["m"]["step"] == 2


def response(rid: str, model: str = "m", finish: str = "stop") -> dict:
    return {"request_id": rid, "model": model, "total_ms": 100.0, "finish_reason": finish}


def thumbs(rid: str, up: bool) -> dict:
    return {"event_id": f"f-{rid}", "kind": "thumbs", "request_id": rid, "thumbs_up": up}


def test_feedback_reward_lands_in_the_window_of_the_response_it_is_about():
    stats = ServiceStats()
    for i in range(2 * CURVE_WINDOW + 10):
        stats.on_response(response(f"r{i}"))
    stats.on_feedback(thumbs("r0", False))                     # window 0, arriving late
    stats.on_feedback(thumbs(f"r{CURVE_WINDOW + 1}", True))    # window 1
    stats.on_feedback(thumbs(f"r{CURVE_WINDOW + 2}", True))
    stats.on_feedback(thumbs("before-this-gateway", True))     # unknown response: no window
    stats.on_feedback({"event_id": "bad", "kind": "rating", "request_id": "r1", "rating": 7.0})  # invalid: ignored
    curve = stats.snapshot()["learning"]["reward"]
    assert [p["at"] for p in curve] == [CURVE_WINDOW, 2 * CURVE_WINDOW, 2 * CURVE_WINDOW + 10]
    assert [(p["mean"], p["rated"]) for p in curve] == [(-1.0, 1), (1.0, 2), (None, 0)]
    assert stats.feedback == 5 and stats.feedback_by_kind == {"thumbs": 4, "rating": 1}


def test_error_answers_are_not_in_the_reward_curve_and_windows_stay_bounded():
    stats = ServiceStats()
    stats.on_response(response("e", finish="error"))
    assert stats.snapshot()["learning"]["reward"] == []
    for i in range((CURVE_POINTS + 3) * CURVE_WINDOW):
        stats.on_response(response(f"r{i}"))
    curve = stats.snapshot()["learning"]["reward"]
    assert len(curve) == CURVE_POINTS and curve[0]["at"] == 4 * CURVE_WINDOW
    stats.on_feedback(thumbs("r0", True))  # its window was dropped: nothing to credit
    assert all(p["rated"] == 0 for p in stats.snapshot()["learning"]["reward"])


def test_routing_share_per_window_of_decisions():
    stats = ServiceStats()
    for i in range(CURVE_WINDOW + 5):
        model = "a" if i < CURVE_WINDOW // 2 or i >= CURVE_WINDOW else "b"
        stats.on_decision({"model": model, "candidates": []})
    routing = stats.snapshot()["learning"]["routing"]
    assert routing == [{"at": CURVE_WINDOW, "shares": {"a": 0.5, "b": 0.5}},
                       {"at": CURVE_WINDOW + 5, "shares": {"a": 1.0}}]


def test_dead_letters_are_counted_per_stage_with_their_reasons():
    stats = ServiceStats()
    for stage, reason in (("router", "thumbs feedback does not name the model that answered"),
                          ("router", "cannot be placed"), ("personalizer", "never seen")):
        stats.on_dead_letter({"stage": stage, "origin_topic": "flywheel.feedback", "reason": reason,
                              "event_time": 1_000_000})
    snap = stats.snapshot()
    assert snap["dead_letters"] == {"router": 2, "personalizer": 1}
    assert snap["recent_dead_letters"][0]["reason"].startswith("thumbs feedback does not name")
