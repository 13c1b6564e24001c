"""Fuzzing in CI's short form (FLYWHEEL_FUZZ_CASES, default 1,000 in all); `flywheel chaos` runs 10,000."""

from __future__ import annotations

import os

import pytest

from flywheel.chaos import fuzz

CASES = int(os.environ.get("FLYWHEEL_FUZZ_CASES", "1000"))


def test_no_crash_on_hostile_inputs():
    result = fuzz.fuzz_all(CASES)
    assert result["cases"] >= CASES
    assert result["crashes"] == 0, "\n".join(result["examples"])


def test_the_harness_counts_crashes(monkeypatch):
    """A deserializer that raises an untyped error must be reported as a crash."""
    async def broken(self, data):
        raise KeyError("bug")

    monkeypatch.setattr("streams.serde.AvroSerde.deserialize", broken)
    report = fuzz.fuzz_deserializers(20)
    assert report.crashes == 20 and "KeyError" in report.examples[0]


def test_the_gateway_fuzzer_catches_accepting_invalid_requests(monkeypatch):
    from flywheel.gateway.app import Gateway

    original = Gateway.build_request

    def lax(self, body, user):
        record = original(self, body, user)
        record["max_tokens"] = 0  # a gateway bug: forwards what the router would dead-letter
        return record

    monkeypatch.setattr(Gateway, "build_request", lax)
    report = fuzz.fuzz_gateway_bodies(200)
    assert report.crashes > 0


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1.0])
def test_hostile_budgets_are_dead_letters(value):
    from core.errors import ValidationError
    from core.validation import validate_request
    from streams.samples import inference_request

    with pytest.raises(ValidationError, match="budget_usd"):
        validate_request(inference_request(budget_usd=value), fuzz.LIMITS)
