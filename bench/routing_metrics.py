"""Routing metrics for any fleet, plus the two-model metrics of Eagle (AUC) and RouteLLM (APGR, CPT).

**Any number of models** (issue 15). Every router hands over an ``(n, K)`` matrix of predicted
quality. For each willingness to pay ``lambda`` (USD per unit of quality) on a grid, every prompt
goes to ``argmax_m lambda * q_hat[i, m] - expected_cost[i, m]`` (ties: lower expected cost, then
lower column); ``lambda = 0`` (cheapest) and ``lambda = inf`` (best predicted quality) are on the
grid. Each lambda gives one operating point: (mean realised quality, mean realised cost). Then:

* ``quality_at_best_single_cost``: the best quality among operating points whose cost does not
  exceed the best single model's (the model with the highest mean quality; ties: cheaper).
* ``cost_to_match_best_single``: the least cost among operating points whose quality reaches the
  best single model's, divided by that model's cost (``None`` if no point reaches it).
* ``oracle_gap_closed``: (quality at best-single cost - best single quality) / (the per-prompt
  oracle's quality at that cost - best single quality). The oracle's predictions are the outcomes.
* ``topic_oracle_gain_reached``: the same gain divided by the topic oracle's gain; the topic
  oracle predicts each model's mean outcome over the prompt's topic file, in hindsight.
* ``rare_recall``: over prompts that only one or two models answer (outcome >= 0.5; with two
  models: exactly one), the mean outcome of the model chosen at the operating point above.

No interpolation between operating points: every router gets the same lambda grid, so what is
reported is what one fixed lambda achieves.

**Two models** (kept from issue 8). The matrix is ``(n, 2)`` for (cheaper, pricier). Two views:

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


# ---------------------------------------------------------------------- any number of models


def lambda_grid(expected_cost: np.ndarray, points: int = 80) -> np.ndarray:
    """0, ``points`` log-spaced values from 0.1x the cheapest to 1e4x the priciest mean cost, inf."""
    means = expected_cost.mean(axis=0)
    low = max(float(means.min()), 1e-12) * 0.1
    high = max(float(means.max()), 1e-12) * 1e4
    return np.concatenate([[0.0], np.logspace(np.log10(low), np.log10(high), points), [np.inf]])


def choices(predicted: np.ndarray, expected_cost: np.ndarray, lam: float) -> np.ndarray:
    """Column chosen per prompt at willingness to pay ``lam`` (ties: cheaper, then lower column)."""
    value = predicted if np.isinf(lam) else lam * predicted - expected_cost
    best = value.max(axis=1, keepdims=True)
    out: np.ndarray = np.where(value >= best, expected_cost, np.inf).argmin(axis=1)
    return out


def operating_points(predicted: np.ndarray, expected_cost: np.ndarray, correct: np.ndarray, cost: np.ndarray,
                     grid: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(quality, cost, choices) per lambda of ``grid``; choices is (len(grid), n)."""
    rows = np.arange(len(correct))
    picked = np.stack([choices(predicted, expected_cost, float(lam)) for lam in grid])
    return correct[rows, picked].mean(axis=1), cost[rows, picked].mean(axis=1), picked


def best_single(correct: np.ndarray, cost: np.ndarray) -> tuple[int, float, float]:
    """(column, mean quality, mean cost) of the best single model (ties: cheaper, then lower column)."""
    quality = correct.mean(axis=0)
    mean_cost = cost.mean(axis=0)
    order = np.lexsort((np.arange(len(quality)), mean_cost, -quality))
    best = int(order[0])
    return best, float(quality[best]), float(mean_cost[best])


def quality_at_cost(quality: np.ndarray, cost: np.ndarray, budget: float) -> tuple[float, int]:
    """(best quality among points with cost <= budget, its point index); budget is relative-tolerant."""
    fits = np.flatnonzero(cost <= budget * (1 + 1e-9) + 1e-15)
    if len(fits) == 0:
        return float("nan"), -1
    best = int(fits[np.argmax(quality[fits])])
    return float(quality[best]), best


def cost_to_reach(quality: np.ndarray, cost: np.ndarray, target: float) -> float | None:
    reach = np.flatnonzero(quality >= target - 1e-12)
    return float(cost[reach].min()) if len(reach) else None


def rare_prompts(correct: np.ndarray) -> np.ndarray:
    """Prompts that only one or two models answer (exactly one when there are two models)."""
    answered = (correct >= 0.5).sum(axis=1)
    most = 1 if correct.shape[1] == 2 else 2
    out: np.ndarray = (answered >= 1) & (answered <= most)
    return out


def topic_means(correct: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """(n, K): each model's mean outcome over the row's topic (the topic oracle's predictions)."""
    out = np.empty_like(correct, dtype=np.float64)
    for g in np.unique(groups):
        members = groups == g
        out[members] = correct[members].mean(axis=0)
    return out


def gain_ratio(gain: float, reference: float) -> float | None:
    return gain / reference if reference > 1e-12 else None


def fleet_metrics(predicted: np.ndarray, expected_cost: np.ndarray, correct: np.ndarray, cost: np.ndarray,
                  groups: np.ndarray, grid: np.ndarray | None = None) -> dict[str, float | None]:
    """The issue-15 metrics of one router on one test split (see the module docstring)."""
    grid = lambda_grid(expected_cost) if grid is None else grid
    _, q_best, c_best = best_single(correct, cost)
    quality, spend, picked = operating_points(predicted, expected_cost, correct, cost, grid)
    q_at, point = quality_at_cost(quality, spend, c_best)
    oracle_q, oracle_c, _ = operating_points(correct, expected_cost, correct, cost, grid)
    topic_q, topic_c, _ = operating_points(topic_means(correct, groups), expected_cost, correct, cost, grid)
    oracle_at, _ = quality_at_cost(oracle_q, oracle_c, c_best)
    topic_at, _ = quality_at_cost(topic_q, topic_c, c_best)
    match = cost_to_reach(quality, spend, q_best)
    rare = rare_prompts(correct)
    rows = np.arange(len(correct))
    recall = float(correct[rows, picked[point]][rare].mean()) if rare.any() else None
    return {
        "quality_at_best_single_cost": q_at,
        "cost_to_match_best_single": None if match is None else match / c_best,
        "oracle_gap_closed": gain_ratio(q_at - q_best, oracle_at - q_best),
        "topic_oracle_gain_reached": gain_ratio(q_at - q_best, topic_at - q_best),
        "rare_recall": recall,
    }


def reference_rows(correct: np.ndarray, cost: np.ndarray, expected_cost: np.ndarray, groups: np.ndarray,
                   models: tuple[str, ...], grid: np.ndarray | None = None) -> dict[str, dict[str, object]]:
    """``best_single``, ``oracle`` and ``topic_oracle`` of one test split."""
    grid = lambda_grid(expected_cost) if grid is None else grid
    best, q_best, c_best = best_single(correct, cost)
    out: dict[str, dict[str, object]] = {"best_single": {"model": models[best], "quality": q_best, "cost": c_best}}
    for name, predicted in (("oracle", correct), ("topic_oracle", topic_means(correct, groups))):
        quality, spend, _ = operating_points(predicted, expected_cost, correct, cost, grid)
        top = int(np.lexsort((spend, -quality))[0])
        q_at, _ = quality_at_cost(quality, spend, c_best)
        out[name] = {"quality": float(quality[top]), "cost": float(spend[top]), "quality_at_best_single_cost": q_at}
    return out
