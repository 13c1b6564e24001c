"""Routing metrics: Eagle's AUC over willingness to pay, RouteLLM's APGR and CPT(x%).

Every router hands over a ``(n, 2)`` matrix of predicted quality for (weak, strong). Two views:

* **AUC (Eagle, arXiv 2409.15518 Fig. 2a).** For each willingness to pay ``lambda`` on 49
  log-spaced points in [1e-10, 1e2] (USD per unit of quality), route every prompt to
  ``argmax lambda * q_hat - expected_cost`` (ties go to the cheaper model) and record the
  realised mean quality; integrate quality over ``log10(lambda)`` with the trapezoid rule. The
  range spans 12 decades, so AUC is between 12 * min and 12 * max model quality. Because the
  switch point moves with the *size* of the predicted quality gap, AUC rewards calibration
  (and overstated gaps) as well as ranking; APGR does not.
* **APGR / CPT (RouteLLM, arXiv 2406.18665).** Sort prompts by the predicted advantage of the
  strong model (ties in a fixed random order) and send the top ``k`` to it, for every ``k``.
  PGR(k) = (quality(k) - q_weak) / (q_strong - q_weak). APGR is the trapezoid area under PGR
  over the strong-call fraction in [0, 1]; CPT(x) is the smallest strong-call percentage
  whose PGR reaches x (linear interpolation between neighbouring k). Random ranking gives
  APGR ~ 0.5; a perfect ranking gives CPT(x) = x * (share of prompts the strong model wins).
"""

from __future__ import annotations

import numpy as np

WTP_GRID = np.logspace(-10, 2, 49)


def quality_vs_wtp(
    predicted: np.ndarray, expected_cost: np.ndarray, correct: np.ndarray, grid: np.ndarray = WTP_GRID
) -> tuple[np.ndarray, np.ndarray]:
    """Per lambda in ``grid``: (realised mean quality, share of prompts sent to the strong model)."""
    n = len(correct)
    rows = np.arange(n)
    quality = np.empty(len(grid))
    strong_share = np.empty(len(grid))
    for i, lam in enumerate(grid):
        value = lam * predicted - expected_cost
        choice = (value[:, 1] > value[:, 0]).astype(np.int64)  # ties -> weak, the cheaper model
        quality[i] = correct[rows, choice].mean()
        strong_share[i] = choice.mean()
    return quality, strong_share


def auc_wtp(predicted: np.ndarray, expected_cost: np.ndarray, correct: np.ndarray) -> float:
    quality, _ = quality_vs_wtp(predicted, expected_cost, correct)
    return float(np.trapezoid(quality, np.log10(WTP_GRID)))


def auc_constant(choice: np.ndarray, correct: np.ndarray) -> float:
    """AUC of a router whose choice ignores lambda (random / always-strong / always-weak)."""
    quality = correct[np.arange(len(correct)), choice].mean()
    return float(quality * (np.log10(WTP_GRID[-1]) - np.log10(WTP_GRID[0])))


def pgr_curve(advantage: np.ndarray, correct: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(strong-call fraction, PGR) for every k = 0..n when the top-k advantage go strong."""
    n = len(correct)
    tiebreak = np.random.default_rng(seed).permutation(n)
    order = np.lexsort((tiebreak, -advantage))
    gain = correct[order, 1] - correct[order, 0]
    quality = (correct[:, 0].sum() + np.concatenate([[0.0], np.cumsum(gain)])) / n
    q_weak, q_strong = correct[:, 0].mean(), correct[:, 1].mean()
    fraction = np.arange(n + 1) / n
    return fraction, (quality - q_weak) / (q_strong - q_weak)


def apgr(advantage: np.ndarray, correct: np.ndarray, seed: int) -> float:
    fraction, pgr = pgr_curve(advantage, correct, seed)
    return float(np.trapezoid(pgr, fraction))


def cpt(advantage: np.ndarray, correct: np.ndarray, target: float, seed: int) -> float:
    """Percentage of strong calls needed to recover ``target`` of the weak->strong gap."""
    fraction, pgr = pgr_curve(advantage, correct, seed)
    hit = int(np.argmax(pgr >= target))
    if pgr[hit] < target:
        return 100.0
    if hit == 0:
        return 0.0
    f0, f1, p0, p1 = fraction[hit - 1], fraction[hit], pgr[hit - 1], pgr[hit]
    return float(100.0 * (f0 + (target - p0) / (p1 - p0) * (f1 - f0)))


def summarise(
    predicted: np.ndarray, expected_cost: np.ndarray, correct: np.ndarray, seed: int
) -> dict[str, float]:
    """auc, apgr, cpt50, cpt80 for one learned router's predicted quality."""
    advantage = predicted[:, 1] - predicted[:, 0]
    return {
        "auc": auc_wtp(predicted, expected_cost, correct),
        "apgr": apgr(advantage, correct, seed),
        "cpt50": cpt(advantage, correct, 0.5, seed),
        "cpt80": cpt(advantage, correct, 0.8, seed),
    }


def aiq(predicted: np.ndarray, expected_cost: np.ndarray, correct: np.ndarray, cost: np.ndarray) -> float:
    """RouterBench's AIQ: mean height of the non-decreasing convex hull of (cost, quality).

    The lambda sweep is traced exactly: prompt i moves to the strong model once
    ``lambda > (c_strong - c_weak) / (q_strong - q_weak)`` (never if its predicted gap is <= 0),
    so the points are the prefixes of that switching order. Scaling every predicted gap by a
    constant leaves the order, hence AIQ, unchanged: AIQ measures ranking, not calibration.
    The area spans [all-weak cost, all-strong cost] and is divided by that width.
    """
    n = len(correct)
    gap = predicted[:, 1] - predicted[:, 0]
    extra = expected_cost[:, 1] - expected_cost[:, 0]
    switch = np.where(gap > 0, extra / np.where(gap > 0, gap, 1.0), np.inf)
    order = np.lexsort((np.arange(n), switch))
    order = order[np.isfinite(switch[order])]
    c = (cost[:, 0].sum() + np.concatenate([[0.0], np.cumsum(cost[order, 1] - cost[order, 0])])) / n
    q = (correct[:, 0].sum() + np.concatenate([[0.0], np.cumsum(correct[order, 1] - correct[order, 0])])) / n
    return hull_area(c, q, cost[:, 0].mean(), cost[:, 1].mean())


def hull_area(costs: np.ndarray, quality: np.ndarray, c_min: float, c_max: float) -> float:
    """Mean over [c_min, c_max] of the upper, non-decreasing convex hull through the points."""
    order = np.lexsort((-quality, costs))
    hull: list[tuple[float, float]] = []
    for x, y in zip(costs[order].tolist(), quality[order].tolist(), strict=True):
        if hull and y <= hull[-1][1]:
            continue  # dominated: costs at least as much for no more quality
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            if (x2 - x1) * (y - y1) - (y2 - y1) * (x - x1) >= 0:  # hull[-1] lies under the chord
                hull.pop()
            else:
                break
        hull.append((x, y))
    hull.append((max(c_max, hull[-1][0]), hull[-1][1]))  # flat after the last useful point
    xs = np.array([h[0] for h in hull])
    ys = np.array([h[1] for h in hull])
    return float(np.trapezoid(ys, xs) / (c_max - c_min))
