from core.slo import SLO_SECONDS, deadline_ms
from streams.samples import inference_request


def test_explicit_deadline_wins_and_class_targets_apply_otherwise():
    req = inference_request()
    assert deadline_ms(req) == req["deadline"]
    req = inference_request(deadline=None, slo_class="batch")
    assert deadline_ms(req) == req["event_time"] + int(SLO_SECONDS["batch"] * 1000)
