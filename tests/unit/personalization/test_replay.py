from __future__ import annotations

from collections import Counter

import pytest

from core.personalization import PreferencePair, SftTarget, select_training_batch


def pair(seq: int, t: float, w: float = 1.0) -> PreferencePair:
    return PreferencePair("q", f"c{seq}", f"r{seq}", w, "pairwise", f"e{seq}", t, seq)


OLD = [pair(i, float(i)) for i in range(40)]
NEW = [pair(40 + i, 40.0 + i) for i in range(6)]
SFT = [SftTarget("q", "t", 0.5, "accept", "e-sft", 45.5, 46)]


def test_all_pending_signals_and_the_replay_fraction() -> None:
    batch = select_training_batch(OLD + NEW, SFT, last_trained_seq=39, replay_fraction=0.5, now_s=50.0,
                                  seed=1)
    seqs = [p.seq for p in batch.pairs] + [t.seq for t in batch.sft]
    pending = {s for s in seqs if s > 39}
    assert pending == set(range(40, 47))
    assert (batch.n_pending, batch.n_replay, batch.trained_upto_seq) == (7, 7, 46)
    assert len(batch) == 14


def test_no_replay_and_deterministic_by_seed() -> None:
    none = select_training_batch(OLD + NEW, [], last_trained_seq=39, replay_fraction=0.0, now_s=50.0, seed=1)
    assert none.n_replay == 0 and len(none) == 6
    a = select_training_batch(OLD + NEW, [], last_trained_seq=39, replay_fraction=0.3, now_s=50.0, seed=3)
    b = select_training_batch(OLD + NEW, [], last_trained_seq=39, replay_fraction=0.3, now_s=50.0, seed=3)
    assert a == b


def test_replay_prefers_recent_signals() -> None:
    counts: Counter[int] = Counter()
    for seed in range(200):
        batch = select_training_batch(OLD + NEW, [], last_trained_seq=39, replay_fraction=0.25, now_s=50.0,
                                      seed=seed, replay_half_life_s=10.0)
        counts.update(s.seq for s in batch.pairs if s.seq <= 39)
    recent = sum(counts[i] for i in range(30, 40))
    early = sum(counts[i] for i in range(0, 10))
    assert recent > 4 * early


def test_nothing_pending_and_bad_fraction() -> None:
    batch = select_training_batch(OLD, [], last_trained_seq=39, replay_fraction=0.5, now_s=50.0, seed=0)
    assert (batch.n_pending, batch.n_replay, batch.trained_upto_seq) == (0, 0, 39)
    with pytest.raises(ValueError, match="replay_fraction"):
        select_training_batch(OLD, [], last_trained_seq=0, replay_fraction=1.0, now_s=0.0, seed=0)
