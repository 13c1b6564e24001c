import pytest

from core.scheduling.state import RequestStatus, is_transition_valid
from tests.unit.scheduling.factories import make_request


def test_legal_lifecycle_and_illegal_moves() -> None:
    assert is_transition_valid(RequestStatus.WAITING, RequestStatus.RUNNING)
    assert is_transition_valid(RequestStatus.RUNNING, RequestStatus.HELD)
    assert is_transition_valid(RequestStatus.HELD, RequestStatus.FINISHED)
    assert not is_transition_valid(RequestStatus.WAITING, RequestStatus.FINISHED)
    assert not is_transition_valid(RequestStatus.FINISHED, RequestStatus.RUNNING)
    assert all(not is_transition_valid(RequestStatus.ABORTED, s) for s in RequestStatus)
    req = make_request("a")
    req.transition(RequestStatus.RUNNING)
    with pytest.raises(ValueError, match="invalid transition running -> waiting"):
        req.transition(RequestStatus.WAITING)


def test_remaining_estimate_doubles_once_the_prediction_is_outlived() -> None:
    req = make_request("a", predicted=10, max_tokens=100)
    req.generated = 4
    assert req.remaining_estimate() == 6
    req.generated = 12
    assert req.remaining_estimate() == 12  # past the prediction: guess it doubles
    req.generated = 95
    assert req.remaining_estimate() == 5  # but never beyond max_tokens
