"""The closed-loop benchmark's numbers: per-window learning curves, finals, lifts, and the picture.

Pure functions over the interaction records the driver collects (``Interaction``); no I/O except
``write_svg``. Windows are consecutive blocks of ``window`` asks in the order they were issued.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Interaction:
    """One ask of one user and what the system did with it."""

    index: int
    """Order in which the ask was issued within its arm (0, 1, 2, ...)."""
    user_id: str
    topic: str
    model: str
    reward: float
    correct: bool
    cost_usd: float
    """Spend on the ask and its regenerations, at catalogue prices."""
    latency_ms: float
    """Client-side time from sending the request to the complete answer."""
    error: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def windows(records: Sequence[Interaction], window: int) -> list[dict[str, Any]]:
    """Per block of ``window`` asks: reward, accuracy, cost, latency, routing share per topic."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    ordered = sorted(records, key=lambda r: r.index)
    out = []
    for start in range(0, len(ordered), window):
        block = ordered[start:start + window]
        share: dict[str, Counter[str]] = defaultdict(Counter)
        for r in block:
            share[r.topic][r.model] += 1
        latencies = [r.latency_ms for r in block if not r.error]
        out.append({
            "start": start,
            "size": len(block),
            "reward": round(statistics.fmean(r.reward for r in block), 4),
            "accuracy": round(statistics.fmean(float(r.correct) for r in block), 4),
            "cost": statistics.fmean(r.cost_usd for r in block),
            "latency_ms": {"p50": round(percentile(latencies, 0.5), 1), "p99": round(percentile(latencies, 0.99), 1)},
            "errors": sum(r.error for r in block),
            "routing_share": {t: {m: round(n / sum(c.values()), 3) for m, n in sorted(c.items())}
                              for t, c in sorted(share.items())},
        })
    return out


def curves(per_window: Sequence[Mapping[str, Any]]) -> dict[str, list[Any]]:
    return {
        "reward": [w["reward"] for w in per_window],
        "accuracy": [w["accuracy"] for w in per_window],
        "cost": [w["cost"] for w in per_window],
        "latency_ms": [w["latency_ms"] for w in per_window],
    }


def spread(values: Sequence[float]) -> dict[str, float]:
    """Mean, standard deviation, min and max over seeds."""
    return {"mean": statistics.fmean(values), "std": statistics.pstdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


def lift(final: Mapping[str, Mapping[str, float]], metric: str, baseline: str = "frozen") -> dict[str, float]:
    base = final[baseline][metric]
    return {arm: (f[metric] / base if base else math.nan) for arm, f in final.items()}


def write_svg(path: Path, series: Mapping[str, Sequence[float]], title: str, ylabel: str,
              window: int, spreads: Mapping[str, Sequence[tuple[float, float]]] | None = None) -> None:
    """A line chart of one metric per arm over windows (min-max band across seeds if given)."""
    width, height, left, right, top, bottom = 720, 420, 70, 150, 40, 50
    colours = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b2", "#937860", "#da8bc3"]
    points = [v for vs in series.values() for v in vs if not math.isnan(v)]
    if spreads:
        points += [x for band in spreads.values() for lo_hi in band for x in lo_hi]
    lo, hi = (min(points), max(points)) if points else (0.0, 1.0)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    pad = 0.05 * (hi - lo)
    lo, hi = lo - pad, hi + pad
    n = max((len(v) for v in series.values()), default=1)

    def x(i: float) -> float:
        return left + (width - left - right) * (i / max(1, n - 1))

    def y(v: float) -> float:
        return top + (height - top - bottom) * (1 - (v - lo) / (hi - lo))

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'font-family="sans-serif" font-size="12">',
             f'<rect width="{width}" height="{height}" fill="white"/>',
             f'<text x="{width / 2}" y="20" text-anchor="middle" font-size="14">{title}</text>',
             f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" stroke="black"/>',
             f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" stroke="black"/>',
             f'<text x="{(left + width - right) / 2}" y="{height - 12}" text-anchor="middle">'
             f'window of {window} requests</text>',
             f'<text x="16" y="{(top + height - bottom) / 2}" text-anchor="middle" '
             f'transform="rotate(-90 16 {(top + height - bottom) / 2})">{ylabel}</text>']
    for k in range(5):
        v = lo + (hi - lo) * k / 4
        parts.append(f'<text x="{left - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{v:.3g}</text>')
        parts.append(f'<line x1="{left}" y1="{y(v):.1f}" x2="{width - right}" y2="{y(v):.1f}" stroke="#eee"/>')
    for i in range(n):
        parts.append(f'<text x="{x(i):.1f}" y="{height - bottom + 16}" text-anchor="middle">{i + 1}</text>')
    for j, (arm, values) in enumerate(series.items()):
        colour = colours[j % len(colours)]
        band = (spreads or {}).get(arm)
        if band and len(band) == len(values) and len(band) > 1:
            upper = " ".join(f"{x(i):.1f},{y(b[1]):.1f}" for i, b in enumerate(band))
            lower = " ".join(f"{x(i):.1f},{y(b[0]):.1f}" for i, b in reversed(list(enumerate(band))))
            parts.append(f'<polygon points="{upper} {lower}" fill="{colour}" fill-opacity="0.15" stroke="none"/>')
        line = " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in enumerate(values) if not math.isnan(v))
        parts.append(f'<polyline points="{line}" fill="none" stroke="{colour}" stroke-width="2"/>')
        for i, v in enumerate(values):
            if not math.isnan(v):
                parts.append(f'<circle cx="{x(i):.1f}" cy="{y(v):.1f}" r="3" fill="{colour}"/>')
        ly = top + 18 * j + 10
        parts.append(f'<line x1="{width - right + 12}" y1="{ly}" x2="{width - right + 32}" y2="{ly}" '
                     f'stroke="{colour}" stroke-width="2"/>')
        parts.append(f'<text x="{width - right + 38}" y="{ly + 4}">{arm}</text>')
    parts.append("</svg>")
    path.write_text("\n".join(parts), encoding="utf-8")
