"""RouterState with the default (local-quality) ranker: the feedback-event rules and exact replay."""

import json
from typing import Any

import numpy as np
import pytest

from core.errors import ValidationError
from core.routing.eagle import EagleConfig
from core.routing.index import NeighbourIndex
from core.routing.local_quality import LocalQualityConfig
from core.routing.state import RouterFeedback, RouterState, algorithm_of

from .conftest import unit_vectors

POOL = ("a", "b", "c")
DIM = 384


def fb(i: int, kind: str, key: str = "p", **kw) -> RouterFeedback:
    return RouterFeedback(feedback_id=f"f{i}", prompt_key=key, kind=kind, **kw)


@pytest.mark.parametrize(("event", "expected"), [
    (fb(1, "thumbs", model="a", thumbs_up=True), [("a", 1.0, 1.0)]),
    (fb(1, "thumbs", model="a", thumbs_up=False), [("a", 0.0, 1.0)]),
    (fb(1, "rating", model="b", rating=0.7), [("b", 0.7, 1.0)]),
    (fb(1, "pairwise", model_a="a", model_b="c", winner="b"), [("a", 0.0, 1.0), ("c", 1.0, 1.0)]),
    (fb(1, "pairwise", model_a="a", model_b="c", winner="tie"), [("a", 0.5, 1.0), ("c", 0.5, 1.0)]),
    (fb(1, "implicit", model="a", signal="accept"), [("a", 1.0, 0.5)]),
    (fb(1, "implicit", model="a", signal="regenerate"), [("a", 0.0, 0.5)]),
    (fb(1, "implicit", model="a", signal="edit"), [("a", 0.0, 0.25)]),
    (fb(1, "implicit", model="a", signal="dwell"), []),
])
def test_feedback_becomes_observations(event, expected):
    state = RouterState(LocalQualityConfig(), POOL)
    assert [(o.model, o.outcome, o.weight) for o in state.observations(event)] == expected


@pytest.mark.parametrize("bad", [fb(1, "thumbs", model="a"), fb(1, "rating", model="a", rating=1.5),
                                 fb(1, "thumbs", thumbs_up=True), fb(1, "pairwise", model_a="a"),
                                 fb(1, "pairwise", model_a="a", model_b="b", winner="c"),
                                 fb(1, "implicit", model="a", signal="stare"), fb(1, "telepathy", model="a")])
@pytest.mark.parametrize("config", [LocalQualityConfig(), EagleConfig()])
def test_both_rankers_dead_letter_the_same_events(bad, config):
    with pytest.raises(ValidationError):
        RouterState(config, POOL).comparisons(bad)
    if isinstance(config, LocalQualityConfig):
        with pytest.raises(ValidationError):
            RouterState(config, POOL).observations(bad)


def test_replay_and_snapshot_round_trip_are_exact():
    rng = np.random.default_rng(0)
    vectors = unit_vectors(200, DIM, seed=1)  # > 128 prompts: two cluster retrains inside the stream
    events = []
    for i in range(400):
        key = int(rng.integers(0, 200))
        kind = ["thumbs", "rating", "pairwise", "implicit"][i % 4]
        model = POOL[int(rng.integers(0, 3))]
        options: dict[str, dict[str, Any]] = {"thumbs": dict(model=model, thumbs_up=bool(rng.integers(0, 2))),
                                              "rating": dict(model=model, rating=float(rng.random())),
                                              "pairwise": dict(model_a=model, model_b=POOL[(POOL.index(model) + 1) % 3],
                                                               winner="a"),
                                              "implicit": dict(model=model, signal="accept")}
        events.append((fb(i, kind, f"p{key}", **options[kind]), vectors[key]))

    def run(items, state=None):
        state = state or RouterState(LocalQualityConfig(clusters=(2, 4)), POOL, NeighbourIndex(exact_limit=64))
        for event, vector in items:
            state.apply(event, vector if event.prompt_key not in state.ranker.index else None)
        return state

    live = run(events)
    assert live.algorithm == algorithm_of(live.ranker.config) == "local_quality"
    assert run(events).snapshot() == live.snapshot()
    half = run(events[:200])
    # Rebuild the index as the agent does: the stored raw embeddings, in insertion order.
    raw = {event.prompt_key: vector for event, vector in events}
    index = NeighbourIndex(exact_limit=64)
    keys = half.ranker.index.keys
    index.add(keys, np.stack([raw[k] for k in keys]))
    restored = RouterState.from_snapshot(json.loads(json.dumps(half.snapshot())), index)
    assert restored.snapshot() == half.snapshot()
    assert run(events[200:], restored).snapshot() == live.snapshot()


def test_old_eagle_snapshots_still_restore():
    state = RouterState(EagleConfig(), POOL)
    state.apply(fb(1, "thumbs", model="a", thumbs_up=True), unit_vectors(1, DIM, 2)[0])
    snapshot = state.snapshot()
    del snapshot["algorithm"]  # written before the default changed
    assert RouterState.from_snapshot(snapshot, state.ranker.index).snapshot()["ranker"] == state.snapshot()["ranker"]


def test_the_stream_in_the_replay_test_crosses_cluster_retrains():
    state = RouterState(LocalQualityConfig(clusters=(2, 4)), POOL, NeighbourIndex(exact_limit=64))
    for i, vector in enumerate(unit_vectors(130, DIM, seed=3)):
        state.apply(fb(i, "thumbs", f"p{i}", model="a", thumbs_up=True), vector)
    levels = state.snapshot()["ranker"]["levels"]
    assert all(level is not None for level in levels) and state.snapshot()["ranker"]["next_clustering"] == 256
