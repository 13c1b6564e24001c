"""The closed-loop benchmark's simulated users: reward, reactions, determinism."""

from __future__ import annotations

import pytest

from bench.loop_users import LoopUser, Reactions, length_fit, make_users, reward
from bench.tasks import Task

CAPITAL = Task("What is the capital of Peru?", "Lima", "contains", "capitals")
SUM = Task("What is 2 + 3?", "5", "number", "arithmetic")


def test_reward_weighs_correctness_and_length_taste() -> None:
    assert reward(CAPITAL, "Lima", concise=True) == 1.0
    assert reward(CAPITAL, "Quito", concise=True) == pytest.approx(0.3 * length_fit("Quito", True))
    long_right = "The capital of Peru is Lima, a large city on the Pacific coast of South America."
    assert reward(CAPITAL, long_right, concise=False) == 1.0
    assert reward(CAPITAL, long_right, concise=True) < 1.0
    assert length_fit(" ".join(["w"] * 32), concise=True) == 0.0


def test_reactions_are_a_function_of_seed_user_and_step() -> None:
    user = LoopUser("u", True, (CAPITAL,), seed=3)
    same = [user.react(0, CAPITAL, "r1", "Quito") for _ in range(3)]
    assert same[0] == same[1] == same[2]
    other = LoopUser("u", True, (CAPITAL,), seed=4)
    outcomes = {str(other.react(i, CAPITAL, "r", "Quito")) for i in range(20)} | {str(same[0])}
    assert len(outcomes) > 1


def test_unsatisfied_users_regenerate_or_complain_and_satisfied_ones_approve() -> None:
    always = Reactions(p_silent=0.0, p_regenerate=1.0, p_edit=1.0)
    user = LoopUser("u", True, (CAPITAL,), seed=0, reactions=always)
    wrong = user.react(0, CAPITAL, "r", "Quito")
    assert wrong.regenerate and wrong.feedback is not None and wrong.feedback["implicit"]["signal"] == "regenerate"
    assert wrong.edit is not None and wrong.edit["implicit"]["edited_text"] == "Lima"
    right = user.react(1, CAPITAL, "r", "Lima")
    assert not right.regenerate and right.edit is None
    body = right.feedback
    assert body is not None
    assert body.get("thumbs_up") is True or body.get("rating", 0) > 0.5 or body["implicit"]["signal"] == "accept"


def test_pairwise_preference_prefers_the_better_answer() -> None:
    user = LoopUser("u", True, (SUM,), seed=0, reactions=Reactions(p_pairwise_after_regenerate=1.0))
    pair = user.compare(0, SUM, ("r1", "m1", "6"), ("r2", "m2", "5"))
    assert pair is not None and pair["pairwise"]["winner"] == "b" and pair["pairwise"]["model_b"] == "m2"


def test_users_share_the_asks_evenly_and_cover_topics() -> None:
    tasks = [CAPITAL, SUM]
    users = make_users(tasks, users=3, requests=10, seed=1)
    assert [len(u.tasks) for u in users] == [4, 3, 3]
    assert {t.topic for u in users for t in u.tasks} == {"capitals", "arithmetic"}
    assert make_users(tasks, 3, 10, 1) == users
    assert {u.concise for u in users} == {True, False}
