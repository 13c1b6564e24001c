"""Step-latency model of an iteration-level engine, fitted from measurements.

One engine iteration decodes one token for every running row and prefills the rows that join.
The torch engine keeps a right-aligned, left-padded KV window shared by all rows, so a decode
step attends over ``rows x window`` cells whatever the rows' own lengths are, and a prefill pads
the joining prompts to the longest one. Hence the model::

    decode(B, W)  = a_d + b_d * B + c_d * B * W          (B rows, window W tokens)
    prefill(n, P) = a_p + b_p * n * P                    (n prompts padded to P tokens)
    iteration     = [B > 0] decode(B, W) + [n > 0] prefill(n, P) + overhead

``a`` is the fixed per-forward cost (30 layers of kernel launches, the LM head's weight read),
``b`` the per-row cost (GEMV -> GEMM rows, sampling, detokenising), ``c`` attention over the
cache. All coefficients are fitted by non-negative least squares from real step timings, so the
simulator and the SLO-aware policy share one calibrated view of the engine.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class StepCostModel:
    decode_base_s: float
    decode_per_row_s: float
    decode_per_cell_s: float
    """Seconds per (row x window token) of attention."""
    prefill_base_s: float
    prefill_per_token_s: float
    """Seconds per padded prompt token."""
    overhead_s: float = 0.0
    """Per-iteration cost outside the model (scheduling, bookkeeping)."""
    swap_per_token_s: float = 0.0
    """Seconds to move one token's KV between device and host memory (either way)."""

    def __post_init__(self) -> None:
        values = self.coefficients()
        if any(v < 0 or not np.isfinite(v) for v in values):
            raise ValueError(f"cost coefficients must be finite and >= 0, got {values}")

    def coefficients(self) -> tuple[float, ...]:
        """All coefficients in field order (``StepCostModel(*m.coefficients()) == m``)."""
        return (self.decode_base_s, self.decode_per_row_s, self.decode_per_cell_s, self.prefill_base_s,
                self.prefill_per_token_s, self.overhead_s, self.swap_per_token_s)

    def decode_s(self, rows: int, window: int) -> float:
        if rows <= 0:
            return 0.0
        return self.decode_base_s + self.decode_per_row_s * rows + self.decode_per_cell_s * rows * window

    def prefill_s(self, rows: int, max_prompt: int) -> float:
        if rows <= 0:
            return 0.0
        return self.prefill_base_s + self.prefill_per_token_s * rows * max_prompt

    def iteration_s(self, decode_rows: int, window: int, prefill_rows: int, max_prompt: int) -> float:
        return self.decode_s(decode_rows, window) + self.prefill_s(prefill_rows, max_prompt) + self.overhead_s

    def swap_s(self, tokens: int) -> float:
        return self.swap_per_token_s * tokens

    def per_token_s(self, rows: int = 1, window: int = 256) -> float:
        """Seconds per generated token of one request in a batch of ``rows`` (decode step + overhead)."""
        return self.decode_s(rows, window) + self.overhead_s

    def scaled(self, factor: float) -> StepCostModel:
        """The same shape on a machine ``factor`` times slower (a shared CPU's current speed)."""
        if factor <= 0:
            raise ValueError(f"factor={factor} must be > 0")
        return StepCostModel(*(v * factor for v in self.coefficients()))

    @classmethod
    def reference_cpu(cls) -> StepCostModel:
        """SmolLM2-135M fp32 on one CPU thread, from the decode table measured in the project notes
        (40 ms at batch 1, 150 ms at batch 32); a default until a real calibration exists."""
        return cls(0.0365, 0.0035, 0.0, 0.03, 0.00012)


def _nnls(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares with non-negative coefficients by dropping negative columns and refitting."""
    active = list(range(x.shape[1]))
    coef = np.zeros(x.shape[1])
    while active:
        sol, *_ = np.linalg.lstsq(x[:, active], y, rcond=None)
        if (sol >= 0).all():
            coef[active] = sol
            return coef
        active.pop(int(np.argmin(sol)))
    return coef


def fit_step_cost(
    decode: Sequence[tuple[int, int, float]],
    prefill: Sequence[tuple[int, int, float]],
    overhead_s: float = 0.0,
) -> StepCostModel:
    """Fit the model from (rows, window, seconds) decode and (rows, max_prompt, seconds) prefill samples."""
    if len(decode) < 3 or len(prefill) < 2:
        raise ValueError(f"need >= 3 decode and >= 2 prefill samples, got {len(decode)} and {len(prefill)}")
    d = np.asarray(decode, dtype=np.float64)
    xd = np.column_stack([np.ones(len(d)), d[:, 0], d[:, 0] * d[:, 1]])
    cd = _nnls(xd, d[:, 2])
    p = np.asarray(prefill, dtype=np.float64)
    xp = np.column_stack([np.ones(len(p)), p[:, 0] * p[:, 1]])
    cp = _nnls(xp, p[:, 2])
    return StepCostModel(float(cd[0]), float(cd[1]), float(cd[2]), float(cp[0]), float(cp[1]), overhead_s)
