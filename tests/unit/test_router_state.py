"""The router's feedback-event rules (core.routing.state), on scripted streams."""

import numpy as np
import pytest

from core.errors import ValidationError
from core.routing.eagle import EagleConfig
from core.routing.state import RouterFeedback, RouterState

POOL = ("a", "b", "c")


def vec(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=384).astype(np.float32)
    return v / np.linalg.norm(v)


def fb(i: int, kind: str, key: str = "p", **kw) -> RouterFeedback:
    return RouterFeedback(feedback_id=f"f{i}", prompt_key=key, kind=kind, **kw)


def test_thumbs_is_one_game_against_the_pool():
    state = RouterState(EagleConfig(), POOL)
    games = state.apply(fb(1, "thumbs", model="a", thumbs_up=True), vec(1))
    assert [(g.a, g.b, g.score_a, g.weight) for g in games] == [("a", "b", 1.0, 0.5), ("a", "c", 1.0, 0.5)]
    ratings = state.ranker.global_ratings()
    # leg 1: E = 0.5, delta = 0.5 * 32 * 0.5 = 8 -> a 1008, b 992
    # leg 2: E = 1 / (1 + 10^(-8/400)) = 0.511511, delta = 16 * (1 - 0.511511) = 7.81582 -> a 1015.8158
    assert ratings["a"] == pytest.approx(1015.8158, abs=1e-3)
    assert ratings["b"] == pytest.approx(992.0) and ratings["c"] == pytest.approx(992.1842, abs=1e-3)


def test_first_rating_plays_the_pool_then_later_ratings_play_the_peers():
    state = RouterState(EagleConfig(), POOL)
    first = state.apply(fb(1, "rating", model="a", rating=0.75), vec(1))
    assert {(g.b, g.score_a) for g in first} == {("b", 0.75), ("c", 0.75)}
    second = state.apply(fb(2, "rating", model="b", rating=0.25), None)
    assert [(g.a, g.b, g.score_a) for g in second] == [("a", "b", 1.0)]  # only the new model's games
    third = state.apply(fb(3, "rating", model="c", rating=0.25), None)
    assert sorted((g.a, g.b, g.score_a) for g in third) == [("a", "c", 1.0), ("b", "c", 0.5)]


def test_implicit_signals_are_weighted_thumbs_and_dwell_is_not_a_game():
    state = RouterState(EagleConfig(), POOL)
    accept = state.comparisons(fb(1, "implicit", model="a", signal="accept"))
    assert all(g.score_a == 1.0 and g.weight == pytest.approx(0.25) for g in accept)
    edit = state.comparisons(fb(2, "implicit", model="a", signal="edit"))
    assert all(g.score_a == 0.0 and g.weight == pytest.approx(0.125) for g in edit)
    assert state.comparisons(fb(3, "implicit", model="a", signal="dwell")) == ()


@pytest.mark.parametrize("bad", [fb(1, "thumbs", model="a"), fb(1, "rating", model="a", rating=1.5),
                                 fb(1, "thumbs", thumbs_up=True), fb(1, "pairwise", model_a="a"),
                                 fb(1, "implicit", model="a", signal="stare"), fb(1, "telepathy", model="a")])
def test_unusable_feedback_is_a_dead_letter(bad):
    with pytest.raises(ValidationError):
        RouterState(EagleConfig(), POOL).comparisons(bad)


def stream() -> list[tuple[RouterFeedback, np.ndarray]]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(200):
        key = f"p{rng.integers(0, 30)}"
        kind = ["thumbs", "rating", "pairwise", "implicit"][i % 4]
        model = POOL[int(rng.integers(0, 3))]
        options: dict[str, dict] = {
            "thumbs": dict(model=model, thumbs_up=bool(rng.integers(0, 2))),
            "rating": dict(model=model, rating=float(rng.random())),
            "pairwise": dict(model_a=model, model_b=POOL[(POOL.index(model) + 1) % 3], winner="a"),
            "implicit": dict(model=model, signal="regenerate")}
        item = options[kind]
        out.append((fb(i, kind, key, **item), vec(int(key[1:]))))
    return out


def test_state_is_a_pure_function_of_the_ordered_stream():
    def run():
        state = RouterState(EagleConfig(), POOL)
        for item, v in stream():
            state.apply(item, v if item.prompt_key not in state.ranker.index else None)
        return state
    first, second = run(), run()
    assert first.snapshot() == second.snapshot()
    restored = RouterState.from_snapshot(first.snapshot(), first.ranker.index)
    assert restored.snapshot() == first.snapshot()
    assert restored.ranker.rank(vec(3)) == first.ranker.rank(vec(3))
