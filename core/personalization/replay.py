"""Choosing what one adapter update trains on: all pending signals plus a replay sample.

Pending signals (``seq > last_trained_seq``) are always included (newest ``max_pending`` of them,
if there are more): they are the evidence the strategy decided to act on. Replay adds
``round(n_pending * f / (1 - f))`` older signals for a replay fraction ``f``, so that ``f`` of the
batch is replay; they are drawn without replacement with probability proportional to
``weight * 0.5 ** (age / replay_half_life_s)`` (Efraimidis–Spirakis keys), so recent and strong
evidence is replayed most. Replay keeps the adapter from forgetting what it learned earlier when
it is warm-started and trained only on a few new signals.

Pure and deterministic: the same inputs and ``seed`` give the same batch.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from core.personalization.signals import PreferencePair, SftTarget

Signal = PreferencePair | SftTarget


@dataclass(frozen=True)
class TrainingBatch:
    pairs: tuple[PreferencePair, ...]
    sft: tuple[SftTarget, ...]
    n_pending: int
    n_replay: int
    trained_upto_seq: int
    """Highest seq among the pending signals (what the strategy marks as trained)."""

    def __len__(self) -> int:
        return len(self.pairs) + len(self.sft)


def select_training_batch(
    pairs: Sequence[PreferencePair],
    sft: Sequence[SftTarget],
    *,
    last_trained_seq: int,
    replay_fraction: float,
    now_s: float,
    seed: int,
    replay_half_life_s: float = 6 * 3600.0,
    max_pending: int = 256,
) -> TrainingBatch:
    if not 0.0 <= replay_fraction < 1.0:
        raise ValueError(f"replay_fraction must be within [0, 1), got {replay_fraction}")
    if replay_half_life_s <= 0 or max_pending < 1:
        raise ValueError(f"need replay_half_life_s > 0 and max_pending >= 1, got {replay_half_life_s}, "
                         f"{max_pending}")
    signals: list[Signal] = [*pairs, *sft]
    pending = sorted((s for s in signals if s.seq > last_trained_seq), key=lambda s: s.seq)
    dropped = pending[:-max_pending] if len(pending) > max_pending else []
    pending = pending[-max_pending:]
    older = [s for s in signals if s.seq <= last_trained_seq] + dropped
    want = round(len(pending) * replay_fraction / (1.0 - replay_fraction))
    rng = random.Random(seed)
    keyed: list[tuple[float, int, Signal]] = []
    for s in older:
        w = s.weight * 0.5 ** (max(0.0, now_s - s.time_s) / replay_half_life_s)
        if w <= 0:
            continue
        # Efraimidis–Spirakis: the k largest u ** (1 / w) are a weighted sample without replacement.
        keyed.append((math.log(rng.random() or 1e-300) / w, s.seq, s))
    keyed.sort(key=lambda t: (t[0], t[1]), reverse=True)
    replay = [s for _, _, s in keyed[:want]]
    chosen = sorted(pending + replay, key=lambda s: s.seq)
    return TrainingBatch(
        pairs=tuple(s for s in chosen if isinstance(s, PreferencePair)),
        sft=tuple(s for s in chosen if isinstance(s, SftTarget)),
        n_pending=len(pending),
        n_replay=len(replay),
        trained_upto_seq=max((s.seq for s in pending), default=last_trained_seq),
    )
