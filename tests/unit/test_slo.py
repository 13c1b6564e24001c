import pytest

from core.slo import CHARS_PER_TOKEN, SLO_SECONDS, SloCheck, deadline_ms
from streams.samples import inference_request


def test_explicit_deadline_wins_and_class_targets_apply_otherwise():
    req = inference_request()
    assert deadline_ms(req) == req["deadline"]
    req = inference_request(deadline=None, slo_class="batch")
    assert deadline_ms(req) == req["event_time"] + int(SLO_SECONDS["batch"] * 1000)


def _beat(worker: str, model: str, backlog_s: float, running: int = 0, mean_tokens: float = 0.0) -> dict:
    cost = {"decode_base_s": 0.05, "decode_per_row_s": 0.001, "decode_per_cell_s": 0.0, "prefill_base_s": 0.02,
            "prefill_per_token_s": 0.0001, "overhead_s": 0.0, "samples": 100}
    return {"worker_id": worker, "model": model, "healthy": True, "running": running, "max_batch": 32,
            "backlog_s": backlog_s, "mean_output_tokens": mean_tokens, "step_cost": cost}


def test_the_routers_slo_check_keeps_the_models_predicted_to_meet_the_deadline():
    check = SloCheck()
    now = 1_000.0
    check.on_heartbeat(_beat("a", "fast", backlog_s=0.0), now)
    check.on_heartbeat(_beat("b", "slow", backlog_s=50.0), now)
    req = inference_request(deadline=int((now + 20) * 1000), max_tokens=100)
    predicted = check.predicted_s(req, now)
    assert predicted["fast"] == pytest.approx(0.02 + 0.0001 * predicted_prompt(req) + 99 * 0.051, rel=1e-6)
    assert predicted["slow"] > 50
    live, note = check.prefer_feasible({"fast", "slow", "unknown"}, req, now)
    assert live == {"fast", "unknown"} and note.startswith("slo: slow predicted")
    # Nobody can make it: the ranking decides among all, as before.
    tight = inference_request(deadline=int((now + 1) * 1000), max_tokens=100)
    assert check.prefer_feasible({"fast", "slow"}, tight, now) == ({"fast", "slow"}, "")
    # Stale heartbeats and workers without a calibration are not judged.
    check.on_heartbeat({**_beat("b", "slow", 50.0), "step_cost": None}, now)
    assert "slow" not in check.predicted_s(req, now) and check.predicted_s(req, now + 60) == {}


def test_recent_answer_lengths_replace_max_tokens_in_the_prediction():
    check = SloCheck()
    check.on_heartbeat(_beat("a", "m", 0.0, mean_tokens=10.0), 0.0)
    req = inference_request(deadline=10_000, max_tokens=500)
    assert check.predicted_s(req, 0.0)["m"] < 1.0


def predicted_prompt(req):
    return len(req["prompt"]) / CHARS_PER_TOKEN + 8
