import math

import pytest

from core.errors import ValidationError
from core.rewards import rewards_from_feedback


def fb(kind, **kw):
    return {"kind": kind, "request_id": "r", **kw}


def test_explicit_signals_are_full_strength():
    assert [a.reward for a in rewards_from_feedback(fb("thumbs", thumbs_up=True))] == [1.0]
    assert [a.reward for a in rewards_from_feedback(fb("thumbs", thumbs_up=False))] == [-1.0]
    assert [a.reward for a in rewards_from_feedback(fb("rating", rating=0.75))] == [0.5]


def test_pairwise_rewards_both_responses():
    pair = {"request_id_a": "a", "model_a": "m1", "request_id_b": "b", "model_b": "m2", "winner": "a"}
    got = {(a.request_id, a.reward) for a in rewards_from_feedback(fb("pairwise", pairwise=pair))}
    assert got == {("a", 1.0), ("b", -1.0)}
    tie = {(a.request_id, a.reward) for a in rewards_from_feedback(fb("pairwise", pairwise=pair | {"winner": "tie"}))}
    assert tie == {("a", 0.0), ("b", 0.0)}


def test_implicit_signals_are_weaker():
    def one(signal, dwell=None):
        return rewards_from_feedback(fb("implicit", implicit={"signal": signal, "dwell_ms": dwell}))[0].reward
    assert one("accept") == 0.5 and one("edit") == -0.25 and one("regenerate") == -0.5
    assert one("dwell", 30_000) == pytest.approx(0.25 * math.tanh(1.0))
    assert 0 < one("dwell", 1_000) < one("dwell", 60_000) < 0.25


@pytest.mark.parametrize("bad", [fb("rating", rating=1.5), fb("rating", rating=None), fb("rating", rating=float("nan")),
                                 fb("thumbs", thumbs_up=None), fb("pairwise", pairwise=None),
                                 fb("implicit", implicit={"signal": "dwell", "dwell_ms": -5}), fb("telepathy")])
def test_invalid_feedback_is_a_dead_letter(bad):
    with pytest.raises(ValidationError):
        rewards_from_feedback(bad)
