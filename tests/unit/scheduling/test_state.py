import pytest

from core.scheduling.length import LengthDistribution
from core.scheduling.state import RequestStatus, is_transition_valid
from tests.unit.scheduling.factories import make_request


def test_legal_lifecycle_and_illegal_moves() -> None:
    assert is_transition_valid(RequestStatus.WAITING, RequestStatus.RUNNING)
    assert is_transition_valid(RequestStatus.RUNNING, RequestStatus.HELD)
    assert is_transition_valid(RequestStatus.HELD, RequestStatus.FINISHED)
    assert is_transition_valid(RequestStatus.RUNNING, RequestStatus.WAITING)  # preempted
    assert not is_transition_valid(RequestStatus.WAITING, RequestStatus.FINISHED)
    assert not is_transition_valid(RequestStatus.FINISHED, RequestStatus.RUNNING)
    assert not is_transition_valid(RequestStatus.HELD, RequestStatus.WAITING)  # static rows are never preempted
    assert all(not is_transition_valid(RequestStatus.ABORTED, s) for s in RequestStatus)
    req = make_request("a")
    req.transition(RequestStatus.RUNNING)
    req.transition(RequestStatus.HELD)
    with pytest.raises(ValueError, match="invalid transition held -> waiting"):
        req.transition(RequestStatus.WAITING)


def test_remaining_estimate_doubles_once_the_prediction_is_outlived() -> None:
    req = make_request("a", predicted=10, max_tokens=100)
    req.generated = 4
    assert req.remaining_estimate() == 6
    req.generated = 12
    assert req.remaining_estimate() == 12  # past the prediction: guess it doubles
    req.generated = 95
    assert req.remaining_estimate() == 5  # but never beyond max_tokens


def test_remaining_quantile_conditions_the_length_distribution_on_what_was_generated() -> None:
    req = make_request("a", predicted=10, max_tokens=100)
    req.length = LengthDistribution(((1.0, 9.0, 0.5), (9.0, 41.0, 0.5)))
    assert req.remaining_quantile(0.5) == pytest.approx(9.0)
    req.generated = 9  # the short half is ruled out: at least one more token, uniform up to 32
    assert req.remaining_quantile(0.5) == pytest.approx(16.5)
    req.generated = 95
    assert req.remaining_quantile(0.9) == pytest.approx(5.0)  # capped by max_tokens
