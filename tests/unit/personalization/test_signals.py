from __future__ import annotations

import pytest

from core.personalization import (
    FeedbackEvent,
    FeedbackKind,
    ProfileConfig,
    SignalWeights,
    TrainingSignals,
    UserProfile,
    extract_signals,
    ingest,
)
from tests.unit.personalization.helpers import event, shown

W = SignalWeights()
CFG = ProfileConfig()


def run(events: list[FeedbackEvent]) -> tuple[UserProfile, list[TrainingSignals]]:
    p = UserProfile("u1")
    out = []
    for e in events:
        p, signals = ingest(p, e, W, CFG)
        out.append(signals)
    return p, out


def test_pairwise_gives_winner_over_loser_and_tie_or_other_prompt_gives_nothing() -> None:
    a, b = shown("q", "alpha"), shown("q", "beta")
    _, (won_b, tie, other_prompt) = run([
        event(FeedbackKind.PAIRWISE, a, 1.0, other=b, winner="b"),
        event(FeedbackKind.PAIRWISE, a, 2.0, other=b, winner="tie"),
        event(FeedbackKind.PAIRWISE, a, 3.0, other=shown("another q", "gamma"), winner="a"),
    ])
    (pair,) = won_b.pairs
    assert (pair.chosen, pair.rejected, pair.weight, pair.source) == ("beta", "alpha", 1.0, "pairwise")
    assert len(tie) == 0 and len(other_prompt) == 0


def test_regenerate_then_accept_prefers_the_accepted_response_and_weights_sft_by_dwell() -> None:
    first, second = shown("q", "meh"), shown("q", "great")
    _, (regen, accept) = run([
        event(FeedbackKind.REGENERATE, first, 1.0),
        event(FeedbackKind.ACCEPT, second, 2.0, dwell_s=10.0),
    ])
    assert len(regen) == 0  # a regenerate only marks memory
    (pair,) = accept.pairs
    assert (pair.chosen, pair.rejected, pair.weight, pair.source) == ("great", "meh", W.regenerate_pair,
                                                                      "regenerate")
    (target,) = accept.sft
    assert target.target == "great"
    assert target.weight == pytest.approx(W.accept_sft * 10.0 / W.dwell_full_s)


def test_dwell_before_accept_is_used_and_missing_dwell_counts_half() -> None:
    r = shown("q", "text")
    _, (_, with_dwell) = run([event(FeedbackKind.DWELL, r, 1.0, dwell_s=40.0),
                              event(FeedbackKind.ACCEPT, r, 2.0)])
    _, (without,) = run([event(FeedbackKind.ACCEPT, shown("q", "t"), 1.0)])
    assert with_dwell.sft[0].weight == pytest.approx(W.accept_sft)
    assert without.sft[0].weight == pytest.approx(W.accept_sft * 0.5)


def test_ratings_pair_by_gap_and_a_positive_rating_endorses_against_regenerated() -> None:
    low, mid, high = shown("q", "low"), shown("q", "mid"), shown("q", "high")
    _, (_, _, close, _, far) = run([
        event(FeedbackKind.RATING, low, 1.0, rating=0.1),
        event(FeedbackKind.REGENERATE, low, 1.5),
        event(FeedbackKind.RATING, mid, 2.0, rating=0.2),  # gap 0.1 < min gap: no pair
        event(FeedbackKind.REGENERATE, mid, 2.5),
        event(FeedbackKind.RATING, high, 3.0, rating=0.9),
    ])
    assert len(close) == 0
    by_source = {(p.source, p.rejected): p for p in far.pairs}
    assert by_source[("rating", "low")].weight == pytest.approx(W.rating_pair)  # gap 0.8 >= 0.5
    assert by_source[("rating", "mid")].weight == pytest.approx(W.rating_pair)
    assert by_source[("regenerate", "low")].chosen == "high"
    assert by_source[("regenerate", "mid")].weight == W.regenerate_pair
    assert len(far.sft) == 0  # a rating is no SFT target


def test_small_rating_gap_scales_the_pair_weight() -> None:
    _, (_, signals) = run([
        event(FeedbackKind.RATING, shown("q", "a"), 1.0, rating=0.5),
        event(FeedbackKind.RATING, shown("q", "b"), 2.0, rating=0.25),
    ])
    (pair,) = signals.pairs
    assert (pair.chosen, pair.rejected) == ("a", "b")
    assert pair.weight == pytest.approx(W.rating_pair * 0.5)


def test_edit_gives_a_pair_and_an_sft_target() -> None:
    _, (signals,) = run([event(FeedbackKind.EDIT, shown("q", "draft"), 1.0, edited_text="final")])
    (pair,) = signals.pairs
    (target,) = signals.sft
    assert (pair.chosen, pair.rejected, pair.source) == ("final", "draft", "edit")
    assert (target.target, target.weight) == ("final", W.edit_sft)


def test_signal_sequence_numbers_are_consecutive_across_events() -> None:
    first, second = shown("q", "x"), shown("q", "y")
    profile, out = run([
        event(FeedbackKind.REGENERATE, first, 1.0),
        event(FeedbackKind.ACCEPT, second, 2.0),
        event(FeedbackKind.EDIT, second, 3.0, edited_text="z"),
    ])
    seqs = [p.seq for signals in out for p in signals.pairs] + [t.seq for signals in out for t in signals.sft]
    assert sorted(seqs) == list(range(len(seqs)))
    assert profile.next_seq == len(seqs)


def test_extract_does_not_change_the_profile_and_zero_weights_disable_rules() -> None:
    p = UserProfile("u1")
    e = event(FeedbackKind.ACCEPT, shown("q", "x"), 1.0)
    assert len(extract_signals(p, e, SignalWeights(accept_sft=0.0))) == 0
    assert p == UserProfile("u1")
    with pytest.raises(ValueError, match="pairwise"):
        SignalWeights(pairwise=1.5)
