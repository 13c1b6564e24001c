"""Output length as a distribution, not a point (TIE, arXiv 2604.00499).

A prediction is a mixture of uniform segments ``(lo, hi, p)``: the length predictor's bucket
probabilities become one segment per power-of-two bucket. From it a scheduler reads quantiles
(a median for "when will it finish", a high quantile for "how much KV memory may it need") and,
once a request has generated ``g`` tokens, the distribution of what is *left*, conditioned on the
length exceeding ``g``. That conditioning is what a point estimate cannot do: a request that
outlives its likely bucket moves its mass to the longer buckets by itself.

Invariants: segments are disjoint and sorted by ``lo``; probabilities are >= 0 and sum to 1; a
segment with ``lo == hi`` is a point mass.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

_EPS = 1e-12


@dataclass(frozen=True)
class LengthDistribution:
    segments: tuple[tuple[float, float, float], ...]
    """(lo, hi, probability) pieces, each uniform on [lo, hi]."""

    def __post_init__(self) -> None:
        if not self.segments:
            raise ValueError("a length distribution needs at least one segment")
        total = 0.0
        prev_hi = -math.inf
        for lo, hi, p in self.segments:
            if not (0 <= lo <= hi) or p < 0 or not math.isfinite(hi):
                raise ValueError(f"bad segment ({lo}, {hi}, {p}): need 0 <= lo <= hi < inf and p >= 0")
            if lo < prev_hi - 1e-9:
                raise ValueError(f"segments overlap or are unsorted at lo={lo} (previous hi={prev_hi})")
            prev_hi = hi
            total += p
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"segment probabilities sum to {total}, not 1")

    # --- constructors ---------------------------------------------------------------------------
    @classmethod
    def point(cls, tokens: float) -> LengthDistribution:
        """All mass at one length (a point prediction, or a known length)."""
        return cls(((float(tokens), float(tokens), 1.0),))

    @classmethod
    def from_pieces(cls, pieces: Sequence[tuple[float, float, float]]) -> LengthDistribution:
        """Normalise non-negative weights into a distribution (zero-weight pieces dropped)."""
        kept = [(float(lo), float(hi), float(p)) for lo, hi, p in pieces if p > 0]
        total = sum(p for _, _, p in kept)
        if total <= 0:
            raise ValueError("no positive weight to build a length distribution from")
        return cls(tuple((lo, hi, p / total) for lo, hi, p in kept))

    # --- reading ----------------------------------------------------------------------------------
    @property
    def mean(self) -> float:
        return sum(p * (lo + hi) / 2 for lo, hi, p in self.segments)

    @property
    def upper(self) -> float:
        """The largest length with positive probability."""
        return max(hi for _, hi, _ in self.segments)

    def cdf(self, x: float) -> float:
        """P(length <= x)."""
        acc = 0.0
        for lo, hi, p in self.segments:
            if x >= hi:
                acc += p
            elif x > lo:
                acc += p * (x - lo) / (hi - lo)
        return min(acc, 1.0)

    def quantile(self, q: float) -> float:
        """Smallest length x with P(length <= x) >= q (linear inside a segment)."""
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"q={q} must be in [0, 1]")
        acc = 0.0
        for lo, hi, p in self.segments:
            if p <= 0:
                continue
            if acc + p >= q - _EPS:
                if hi == lo:
                    return lo
                return lo + (hi - lo) * max(q - acc, 0.0) / p
            acc += p
        return self.upper

    # --- conditioning ---------------------------------------------------------------------------
    def capped(self, cap: float) -> LengthDistribution:
        """The length when generation is cut at ``cap`` tokens (mass above becomes a point at cap)."""
        if cap <= 0:
            raise ValueError(f"cap={cap} must be > 0")
        pieces: list[tuple[float, float, float]] = []
        above = 0.0
        for lo, hi, p in self.segments:
            if hi <= cap:
                pieces.append((lo, hi, p))
            elif lo >= cap:
                above += p
            else:
                share = (cap - lo) / (hi - lo)
                pieces.append((lo, cap, p * share))
                above += p * (1 - share)
        if above > 0:
            pieces.append((cap, cap, above))
        return LengthDistribution.from_pieces(pieces)

    def remaining(self, generated: int, cap: float | None = None) -> LengthDistribution:
        """Tokens still to come given ``generated`` so far, conditioned on length > generated.

        When the prediction puts (almost) no mass beyond ``generated``, it has been proven wrong;
        with power-of-two buckets the natural guess is the next bucket, [g, 2g], so the rest is
        uniform on [1, g]. ``cap`` is the hard limit on the total length (``max_tokens``).
        """
        g = float(max(generated, 0))
        pieces: list[tuple[float, float, float]] = []
        for lo, hi, p in self.segments:
            if hi <= g:  # lengths already reached (a point at g included) cannot be the answer
                continue
            start = max(lo, g)
            share = 1.0 if hi == lo else (hi - start) / (hi - lo)
            pieces.append((start - g, hi - g, p * share))
        mass = sum(p for *_, p in pieces)
        if mass < 1e-9:
            pieces = [(1.0, max(g, 1.0), 1.0)]
        # A request that has not finished needs at least one more token.
        pieces = [(max(lo, 1.0), max(hi, 1.0), p) for lo, hi, p in pieces]
        dist = LengthDistribution.from_pieces(_merge_overlaps(pieces))
        if cap is not None:
            left = max(cap - g, 1.0)
            dist = dist.capped(left)
        return dist


    def remaining_quantile(self, generated: int, q: float, cap: float | None = None) -> float:
        """``self.remaining(generated, cap).quantile(q)`` without building the distribution (the
        scheduler asks this for every row at every iteration)."""
        g = float(max(generated, 0))
        left = max(cap - g, 1.0) if cap is not None else math.inf
        pieces: list[tuple[float, float, float]] = []
        mass = 0.0
        for lo, hi, p in self.segments:
            if hi <= g or p <= 0:
                continue
            start = max(lo, g)
            w = p if hi == lo else p * (hi - start) / (hi - lo)
            pieces.append((max(start - g, 1.0), max(hi - g, 1.0), w))
            mass += w
        if mass < 1e-9:
            pieces, mass = [(1.0, max(g, 1.0), 1.0)], 1.0
        target = q * mass
        acc = 0.0
        for lo, hi, w in pieces:
            if lo >= left:
                return left
            if acc + w >= target - _EPS * mass:
                x = lo if hi == lo else lo + (hi - lo) * max(target - acc, 0.0) / w
                return min(x, left)
            acc += w
        return min(pieces[-1][1], left)


def _merge_overlaps(pieces: list[tuple[float, float, float]]) -> list[tuple[float, float, float]]:
    """Clamping to >= 1 can make the first pieces overlap at 1; fold such points into a point mass."""
    out: list[tuple[float, float, float]] = []
    for lo, hi, p in sorted(pieces):
        if out and lo < out[-1][1] - 1e-9:
            plo, phi, pp = out[-1]
            out[-1] = (min(plo, lo), max(phi, hi), pp + p)
        else:
            out.append((lo, hi, p))
    return out
