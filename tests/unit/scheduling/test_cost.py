import pytest

from core.scheduling.cost import StepCostModel, fit_step_cost


def test_fit_recovers_known_coefficients() -> None:
    true = StepCostModel(0.03, 0.002, 1e-6, 0.01, 2e-4)
    decode = [(b, w, true.decode_s(b, w)) for b in (1, 2, 4, 8, 16, 32) for w in (64, 256)]
    prefill = [(n, p, true.prefill_s(n, p)) for n in (1, 4, 8) for p in (32, 128)]
    fit = fit_step_cost(decode, prefill)
    for got, want in zip(
        (
            fit.decode_base_s,
            fit.decode_per_row_s,
            fit.decode_per_cell_s,
            fit.prefill_base_s,
            fit.prefill_per_token_s,
        ),
        (
            true.decode_base_s,
            true.decode_per_row_s,
            true.decode_per_cell_s,
            true.prefill_base_s,
            true.prefill_per_token_s,
        ),
        strict=True,
    ):
        assert got == pytest.approx(want, rel=1e-6, abs=1e-12)


def test_negative_terms_are_dropped_not_fitted() -> None:
    # Timings that fall with batch size would need a negative per-row term.
    decode = [(1, 10, 0.05), (2, 10, 0.049), (4, 10, 0.048), (8, 10, 0.047)]
    fit = fit_step_cost(decode, [(1, 10, 0.01), (2, 10, 0.02)])
    assert fit.decode_per_row_s >= 0 and fit.decode_per_cell_s >= 0
    with pytest.raises(ValueError, match="decode"):
        fit_step_cost(decode[:2], [(1, 10, 0.01), (2, 10, 0.02)])
    with pytest.raises(ValueError, match="finite"):
        StepCostModel(-1.0, 0, 0, 0, 0)


def test_scaled_model_is_uniformly_slower() -> None:
    base = StepCostModel(0.03, 0.002, 1e-6, 0.01, 2e-4, overhead_s=0.001)
    slow = base.scaled(1.5)
    assert slow.iteration_s(8, 100, 2, 50) == pytest.approx(1.5 * base.iteration_s(8, 100, 2, 50))
    with pytest.raises(ValueError, match="factor"):
        base.scaled(0.0)
