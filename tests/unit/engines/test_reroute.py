"""Admission control's reroute: to the cheapest live candidate that costs less, at most once."""

from streams.events import inference_request
from workers.reroute import REROUTE_REASON, REROUTED_FROM, reroute_target, rerouted_decision


def _decision(model: str, live: dict[str, bool], metadata: dict[str, str] | None = None) -> dict:
    req = inference_request(user_id="u", prompt="hi", metadata=metadata)
    return {"event_id": "e", "correlation_id": req["request_id"], "tenant_id": "default", "user_id": "u",
            "event_time": req["event_time"], "request": req, "model": model, "fallbacks": [], "router_name": "t",
            "router_version": "0", "reason": "best", "feedback_offset": -1,
            "candidates": [{"model": m, "live": ok, "within_budget": True} for m, ok in live.items()]}


def test_only_a_cheaper_live_model_is_a_target() -> None:
    assert reroute_target(_decision("gemma3-270m", {"smollm2-135m": True, "gemma3-270m": True}),
                          "gemma3-270m") == "smollm2-135m"
    assert reroute_target(_decision("gemma3-270m", {"smollm2-135m": False}), "gemma3-270m") is None  # not live
    assert reroute_target(_decision("smollm2-135m", {"gemma3-270m": True}), "smollm2-135m") is None  # dearer


def test_a_rerouted_decision_keeps_the_request_and_its_deadline_and_is_never_rerouted_again() -> None:
    original = _decision("gemma3-270m", {"smollm2-135m": True})
    moved = rerouted_decision(original, "smollm2-135m", "cannot meet its deadline", "w1")
    assert moved["model"] == "smollm2-135m" and moved["event_id"] != original["event_id"]
    assert moved["request"]["request_id"] == original["request"]["request_id"]
    assert moved["request"]["event_time"] == original["request"]["event_time"]  # the deadline does not move
    assert moved["request"]["metadata"] == {REROUTED_FROM: "gemma3-270m", REROUTE_REASON: "cannot meet its deadline"}
    assert "rerouted by w1" in moved["reason"]
    assert reroute_target(moved, "smollm2-135m") is None
