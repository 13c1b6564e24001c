"""Fault injection, short form: each fault once on the real broker, Postgres, router and worker.
(`flywheel chaos` runs every fault three times, plus 10,000 fuzz cases, a load ramp and a soak.)"""

from __future__ import annotations

import uuid

import pytest

from flywheel.chaos.faults import FAULTS, run_faults
from tests.integration.conftest import make_settings

pytestmark = [pytest.mark.integration, pytest.mark.chaos, pytest.mark.model]


async def test_every_fault_once_loses_and_duplicates_nothing(kafka_broker, postgres):
    settings = make_settings(topic_prefix=f"chaos{uuid.uuid4().hex[:6]}.")
    results = await run_faults(settings, FAULTS, runs=1)
    assert [r.fault for r in results] == list(FAULTS)
    for r in results:
        assert r.lost == 0, r
        assert r.duplicated == 0, r
        assert r.feedback_lost == 0, r
        assert r.overspent == 0, r
        assert r.ratings_match_replay, r
