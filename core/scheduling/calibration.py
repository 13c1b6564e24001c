"""Online calibration of the step-cost model from a live worker's own iterations.

A worker starts from a prior (``prior_cost``: the reference SmolLM2 fit scaled by the model's
catalogued per-token latency, about right in shape but often several times off in scale on a
given machine) and records every iteration it runs: (decode rows B, KV window W, prefill rows n,
longest prefill P, seconds inside the engine). Every ``refit_every`` iterations it refits

    seconds ~ [B>0] a_d + b_d B + c_d B W + [n>0] a_p + b_p n P

over the last ``window`` iterations by non-negative least squares with a ridge pull toward the
prior: each coefficient j adds ``prior_weight`` pseudo-observations of ``s_j (theta_j - prior_j)``,
where ``s_j`` is the RMS of column j over the window. The pull keeps coefficients the traffic
cannot separate (a worker that only ever ran batch 1 cannot tell a_d from b_d) at the prior's
ratio, while any well-covered direction follows the data within a few dozen iterations.

The loop's own per-iteration overhead (wall time outside the engine) is tracked as an
exponential moving average. Pure and synchronous: the serving loop feeds it, the scheduler,
heartbeats, the router's SLO check and the deployer read ``model``.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from core.scheduling.cost import StepCostModel, _nnls

REFERENCE_PER_TOKEN_MS = 40.0
"""Batch-1 per-token latency of ``StepCostModel.reference_cpu()`` (SmolLM2-135M, fp32, one thread)."""


def prior_cost(per_token_latency_ms: float) -> StepCostModel:
    """A starting cost model for a model whose batch-1 decode takes ``per_token_latency_ms``."""
    if per_token_latency_ms <= 0:
        raise ValueError(f"per_token_latency_ms={per_token_latency_ms} must be > 0")
    return StepCostModel.reference_cpu().scaled(per_token_latency_ms / REFERENCE_PER_TOKEN_MS)


@dataclass(frozen=True)
class OnlineCostConfig:
    window: int = 512
    """Iterations kept for the fit (older ones are forgotten: the machine's speed drifts)."""
    refit_every: int = 32
    """Iterations between refits."""
    min_samples: int = 16
    """Iterations before the first refit (until then the prior is used)."""
    prior_weight: float = 4.0
    """Pseudo-observations per coefficient pulling it toward the prior."""
    overhead_smoothing: float = 0.05
    """Weight of each new iteration in the loop-overhead moving average."""

    def __post_init__(self) -> None:
        if self.window < 8 or self.refit_every < 1 or self.min_samples < 1:
            raise ValueError(f"window={self.window} must be >= 8, refit_every={self.refit_every} and "
                             f"min_samples={self.min_samples} >= 1")
        if self.prior_weight < 0 or not 0 < self.overhead_smoothing <= 1:
            raise ValueError(f"prior_weight={self.prior_weight} must be >= 0 and overhead_smoothing="
                             f"{self.overhead_smoothing} in (0, 1]")


def _features(decode_rows: int, window: int, prefill_rows: int, max_prompt: int) -> list[float]:
    return [float(decode_rows > 0), float(decode_rows), float(decode_rows * window), float(prefill_rows > 0),
            float(prefill_rows * max_prompt)]


class OnlineCostModel:
    def __init__(self, prior: StepCostModel, config: OnlineCostConfig | None = None) -> None:
        self.prior = prior
        self.config = config or OnlineCostConfig()
        self._x: deque[list[float]] = deque(maxlen=self.config.window)
        self._y: deque[float] = deque(maxlen=self.config.window)
        self._overhead = prior.overhead_s
        self._since_fit = 0
        self.samples = 0
        """Iterations observed in total."""
        self.fits = 0
        self.model = prior
        """The current estimate (the prior until the first refit)."""

    def observe(self, decode_rows: int, window: int, prefill_rows: int, max_prompt: int, seconds: float,
                overhead_s: float | None = None) -> bool:
        """Record one iteration; returns True when this call refitted ``model``."""
        if seconds <= 0 or not np.isfinite(seconds) or (decode_rows <= 0 and prefill_rows <= 0):
            return False
        self._x.append(_features(decode_rows, window, prefill_rows, max_prompt))
        self._y.append(seconds)
        if overhead_s is not None and overhead_s >= 0:
            a = self.config.overhead_smoothing
            self._overhead = (1 - a) * self._overhead + a * overhead_s
        self.samples += 1
        self._since_fit += 1
        if self.samples >= self.config.min_samples and self._since_fit >= self.config.refit_every:
            self.refit()
            return True
        return False

    def refit(self) -> StepCostModel:
        if not self._y:
            return self.model
        x = np.asarray(self._x, dtype=np.float64)
        y = np.asarray(self._y, dtype=np.float64)
        p = self.prior
        theta0 = np.asarray([p.decode_base_s, p.decode_per_row_s, p.decode_per_cell_s, p.prefill_base_s,
                             p.prefill_per_token_s])
        scale = np.sqrt((x * x).mean(axis=0))
        # A column never seen (e.g. no prefill in the window) has only the pull: it stays at the prior.
        scale = np.where(scale > 0, scale, 1.0)
        lam = np.sqrt(self.config.prior_weight)
        xa = np.vstack([x, lam * np.diag(scale)])
        ya = np.concatenate([y, lam * scale * theta0])
        coef = _nnls(xa, ya)
        self.model = StepCostModel(float(coef[0]), float(coef[1]), float(coef[2]), float(coef[3]), float(coef[4]),
                                   overhead_s=float(self._overhead), swap_per_token_s=p.swap_per_token_s)
        self._since_fit = 0
        self.fits += 1
        return self.model

    def relative_error(self) -> float:
        """Median |predicted - measured| / measured over the window, under the current model."""
        if not self._y:
            return float("nan")
        m = self.model
        coef = np.asarray([m.decode_base_s, m.decode_per_row_s, m.decode_per_cell_s, m.prefill_base_s,
                           m.prefill_per_token_s])
        x = np.asarray(self._x, dtype=np.float64)
        y = np.asarray(self._y, dtype=np.float64)
        return float(np.median(np.abs(x @ coef - y) / y))
