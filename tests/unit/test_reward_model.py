"""The online reward model: it learns scripted preferences, measures held-out accuracy correctly
(balanced, so a constant answer cannot pass), gates scoring on it, and is a pure function of the
ordered example stream (snapshot + restore continues bit for bit)."""

from __future__ import annotations

import numpy as np
import pytest

from core.reward_model import (
    Example,
    Label,
    RewardModel,
    RewardModelConfig,
    feature_dim,
    is_heldout,
    label_of,
    response_features,
    text_statistics,
)

DIM = 24


def scripted_stream(n: int, seed: int = 0, kind: str = "pairwise", noise: float = 0.0) -> list[Example]:
    """Preferences of a hidden linear taste ``w*`` over random responses."""
    rng = np.random.default_rng(seed)
    taste = rng.normal(size=DIM)
    out = []
    for i in range(n):
        if kind == "pairwise":
            a, b = rng.normal(size=DIM), rng.normal(size=DIM)
            a_wins = (taste @ (a - b) + noise * rng.normal()) > 0
            out.append(Example.of(f"p{seed}-{i}", Label("pairwise", ("a", "b"), 1.0 if a_wins else 0.0), [a, b]))
        else:
            x = rng.normal(size=DIM)
            good = (taste @ x + noise * rng.normal()) > 0
            out.append(Example.of(f"t{seed}-{i}", Label("pointwise", ("r",), 1.0 if good else 0.0), [x]))
    return out


def test_it_learns_scripted_pairwise_preferences():
    model = RewardModel(RewardModelConfig(dim=DIM))
    model.fit(scripted_stream(600))
    accuracy = model.accuracy()
    assert accuracy.balanced is not None and accuracy.balanced >= 0.9
    assert accuracy.heldout >= 30 and model.usable()
    assert model.trained + len(model.heldout) == model.seen == 600  # held-out examples are never trained on


def test_it_learns_scripted_thumbs_and_scores_good_answers_higher():
    model = RewardModel(RewardModelConfig(dim=DIM))
    stream = scripted_stream(800, kind="pointwise")
    model.fit(stream[:700])
    assert model.usable()
    fresh = stream[700:]
    rewards = model.rewards(np.stack([e.features for e in fresh]))
    good = [r for r, e in zip(rewards, fresh, strict=True) if e.label.target == 1.0]
    bad = [r for r, e in zip(rewards, fresh, strict=True) if e.label.target == 0.0]
    assert np.mean(good) > 0.3 > -0.3 > np.mean(bad)
    assert np.all(np.abs(rewards) < 1.0)


def test_accuracy_is_counted_exactly_and_balanced():
    cfg = RewardModelConfig(dim=2, min_heldout=1, heldout_window=10)
    model = RewardModel(cfg)
    model.weights = np.array([1.0, 0.0, 0.0])  # s = x0 (+ bias 0)

    def ex(i: int, kind: str, x0: float, target: float) -> Example:
        ids = ("a", "b") if kind == "pairwise" else ("r",)
        return Example(f"e{i}", Label(kind, ids, target), np.array([x0, 0.0], dtype=np.float32))  # type: ignore[arg-type]

    # pairwise: 3 of 4 right. pointwise: 3 good answers all right, 1 bad answer wrong -> (1 + 0) / 2
    model.heldout.extend([ex(0, "pairwise", 1, 1), ex(1, "pairwise", -1, 0), ex(2, "pairwise", 2, 1),
                          ex(3, "pairwise", 1, 0), ex(4, "pointwise", 1, 1), ex(5, "pointwise", 1, 1),
                          ex(6, "pointwise", 3, 1), ex(7, "pointwise", 2, 0), ex(8, "pairwise", 5, 0.5)])
    accuracy = model.accuracy()
    assert accuracy.heldout == 8  # the tie does not count
    assert accuracy.balanced == pytest.approx((0.75 * 4 + 0.5 * 4) / 8)


def test_a_constant_or_undecided_model_never_passes_the_threshold():
    cfg = RewardModelConfig(dim=DIM, min_heldout=10)
    rng = np.random.default_rng(3)
    always_up = [Example.of(f"u{i}", Label("pointwise", ("r",), 1.0 if rng.random() < 0.85 else 0.0),
                            [rng.normal(size=DIM)]) for i in range(400)]
    model = RewardModel(cfg)
    model.fit(always_up)  # features carry no signal; 85 % thumbs up
    balanced = model.accuracy().balanced
    assert balanced is not None and balanced < 0.65
    assert not model.usable()
    untrained = RewardModel(cfg)
    untrained.heldout.extend(e for e in scripted_stream(50) if e.label.target != 0.5)
    assert untrained.accuracy().balanced == 0.0  # logit 0 is never counted as right


def test_below_min_heldout_accuracy_is_unknown_and_the_model_unused():
    model = RewardModel(RewardModelConfig(dim=DIM, min_heldout=30))
    model.fit(scripted_stream(40))
    assert model.accuracy().heldout < 30 and model.accuracy().balanced is None
    assert not model.usable()


def test_threshold_gates_use():
    stream = scripted_stream(600, noise=2.0)
    strict, lenient = (RewardModel(RewardModelConfig(dim=DIM, min_accuracy=t)) for t in (0.99, 0.6))
    strict.fit(stream)
    lenient.fit(stream)
    balanced = strict.accuracy().balanced
    assert balanced is not None and 0.6 <= balanced < 0.99
    assert lenient.usable() and not strict.usable()


def test_same_stream_same_weights_and_restore_continues_exactly():
    stream = scripted_stream(300, seed=5)
    cfg = RewardModelConfig(dim=DIM, buffer=50)
    one, two = RewardModel(cfg), RewardModel(cfg)
    one.fit(stream)
    two.fit(stream[:170])
    by_id = {e.example_id: e for e in stream}
    restored = RewardModel.restore(cfg, two.state(), by_id)
    restored.fit(stream[170:])
    assert np.array_equal(one.weights, restored.weights) and np.array_equal(one.grad_sq, restored.grad_sq)
    assert one.accuracy() == restored.accuracy()
    with pytest.raises(ValueError, match="examples that were not given"):
        RewardModel.restore(cfg, two.state(), {})


def test_heldout_split_is_a_stable_share_of_ids():
    ids = [f"fb-{i}" for i in range(5000)]
    share = sum(is_heldout(i, 0.2) for i in ids) / len(ids)
    assert 0.18 < share < 0.22
    assert [is_heldout(i, 0.2) for i in ids[:50]] == [is_heldout(i, 0.2) for i in ids[:50]]


def test_labels_of_every_feedback_kind():
    def fb(kind, **kw):
        return {"kind": kind, "request_id": "r", **kw}
    pair = {"request_id_a": "a", "model_a": "m", "request_id_b": "b", "model_b": "n", "winner": "b"}
    assert label_of(fb("pairwise", pairwise=pair)) == Label("pairwise", ("a", "b"), 0.0)
    assert label_of(fb("pairwise", pairwise=pair | {"winner": "tie"})).target == 0.5  # type: ignore[union-attr]
    assert label_of(fb("rating", rating=0.8)) == Label("pointwise", ("r",), 0.8)
    assert label_of(fb("thumbs", thumbs_up=False)) == Label("pointwise", ("r",), 0.0)
    assert label_of(fb("implicit", implicit={"signal": "accept"})) == Label("pointwise", ("r",), 1.0, 0.5)
    assert label_of(fb("implicit", implicit={"signal": "edit"})) == Label("pointwise", ("r",), 0.0, 0.25)
    assert label_of(fb("implicit", implicit={"signal": "dwell", "dwell_ms": 5000})) is None
    for bad in (fb("rating", rating=2.0), fb("thumbs"), fb("telepathy"), fb("pairwise", pairwise={})):
        with pytest.raises(ValueError):
            label_of(bad)


def test_features_line_up_and_text_statistics_see_garbage():
    rng = np.random.default_rng(0)
    p, r = rng.normal(size=(3, 8)), rng.normal(size=(3, 8))
    p /= np.linalg.norm(p, axis=1, keepdims=True)
    r /= np.linalg.norm(r, axis=1, keepdims=True)
    x = response_features(p, r, ["Paris.", "", "the the the the"])
    assert x.shape == (3, feature_dim(8)) and x.dtype == np.float32
    assert x[1, -4] == 1.0  # empty answer flag
    assert text_statistics("the the the the")[2] == pytest.approx(0.75)
    assert text_statistics("<sT>aT>r>e")[3] > text_statistics("Paris is the capital.")[3]
    with pytest.raises(ValueError, match="line up"):
        response_features(p, r[:2], ["a", "b", "c"])


def test_config_is_validated():
    with pytest.raises(ValueError, match="min_heldout"):
        RewardModelConfig(dim=4, min_heldout=500, heldout_window=200)
    with pytest.raises(ValueError, match="heldout_share"):
        RewardModelConfig(dim=4, heldout_share=1.0)
    with pytest.raises(ValueError, match="features of shape"):
        RewardModel(RewardModelConfig(dim=4)).update(Example("x", Label("pointwise", ("r",), 1.0), np.zeros(3)))


@pytest.mark.model
def test_on_real_embeddings_it_learns_that_users_reject_garbage():
    """Scripted users on real MiniLM features: correct short answers are preferred to garbage and
    to wrong answers (the failure issue 11 saw: a model emitting '<sT>aT>r>e')."""
    from core.embedding import get_embedder

    facts = [("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Egypt", "Cairo"),
             ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Canada", "Ottawa"), ("Greece", "Athens"),
             ("Norway", "Oslo"), ("Poland", "Warsaw"), ("Chile", "Santiago"), ("Cuba", "Havana"),
             ("Ireland", "Dublin"), ("Austria", "Vienna"), ("Portugal", "Lisbon"), ("Thailand", "Bangkok"),
             ("Sweden", "Stockholm"), ("Finland", "Helsinki"), ("Hungary", "Budapest")]
    rng = np.random.default_rng(1)
    garbage = ["<sT>aT>r>e", "]]]]] ]]]", "a a a a a a a a", "<|im_start|><|im_start|>", "?!?!? ..--.."]
    prompts, goods, bads = [], [], []
    for i in range(240):
        country, capital = facts[i % len(facts)]
        wrong = facts[(i + 1 + int(rng.integers(len(facts) - 1))) % len(facts)][1]
        prompts.append(f"What is the capital city of {country}?")
        goods.append(f"The capital of {country} is {capital}.")
        bads.append(garbage[i % len(garbage)] if i % 2 else f"The capital of {country} is {wrong}.")
    embedder = get_embedder()
    pe = embedder.embed(prompts)
    good_x = response_features(pe, embedder.embed(goods), goods)
    bad_x = response_features(pe, embedder.embed(bads), bads)
    model = RewardModel(RewardModelConfig(dim=good_x.shape[1], min_heldout=20))
    for i in range(len(prompts)):
        a_first = bool(rng.random() < 0.5)  # the preferred answer is shown first only half the time
        pair = [good_x[i], bad_x[i]] if a_first else [bad_x[i], good_x[i]]
        model.update(Example.of(f"f{i}", Label("pairwise", ("a", "b"), 1.0 if a_first else 0.0), pair))
    accuracy = model.accuracy()
    assert accuracy.balanced is not None and accuracy.balanced >= 0.8, accuracy
    assert model.usable()


def test_a_lucky_window_does_not_pass_the_gate():
    """0.7 measured on 40 held-out examples is 0.7 - sqrt(0.21 / 40) = 0.63 at one standard error:
    below a 0.65 threshold, although the point estimate is above it."""
    def model(z: float) -> RewardModel:
        m = RewardModel(RewardModelConfig(dim=1, min_heldout=10, heldout_window=100, confidence_z=z))
        m.weights = np.array([1.0, 0.0])
        m.heldout.extend(Example(f"e{i}", Label("pairwise", ("a", "b"), 1.0 if i < 28 else 0.0),
                                 np.array([1.0], dtype=np.float32)) for i in range(40))  # 28 of 40 right
        return m

    strict, naive = model(1.0), model(0.0)
    assert strict.accuracy().balanced == pytest.approx(0.7) and strict.accuracy().heldout == 40
    assert strict.accuracy().lower_bound(1.0) == pytest.approx(0.7 - (0.21 / 40) ** 0.5)
    assert naive.usable() and not strict.usable()


def test_preferences_between_models_cannot_open_a_models_gate():
    """Users prefer model a's style: the scorer learns it, but that says nothing about telling a's
    good answers from its bad ones, so no per-model gate opens; a's own thumbs do open a's."""
    rng = np.random.default_rng(4)
    style = np.zeros(DIM)
    style[0] = 3.0
    cross = []
    for i in range(400):
        a, b = rng.normal(size=DIM) + style, rng.normal(size=DIM)
        cross.append(Example.of(f"x{i}", Label("pairwise", ("a", "b"), 1.0), [a, b], ["model-a", "model-b"]))
    model = RewardModel(RewardModelConfig(dim=DIM))
    model.fit(cross)
    assert model.usable() and all(e.scope == "" for e in cross)  # all held out together: it looks trusted
    assert model.scopes() == [] and not model.usable("model-a") and model.accuracy("model-a").balanced is None
    own = [Example(e.example_id, e.label, e.features, "model-a") for e in scripted_stream(400, kind="pointwise")]
    model.fit(own)
    assert model.scopes() == ["model-a"] and model.usable("model-a") and not model.usable("model-b")
