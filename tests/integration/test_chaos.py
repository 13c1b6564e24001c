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


async def test_killing_the_leader_of_requests_and_feedback_on_a_cluster_loses_nothing(postgres, tmp_path):
    """Three brokers (replication 3, min.insync.replicas 2); the leader of the feedback partition
    (and its requests partitions) is SIGKILLed mid-stream. The worker runs the echo engine: the
    fault is in the event plane, not in a model."""
    from infra.localkafka import LocalKafka
    from tests.conftest import TEST_HOME, TEST_KAFKA_PORT

    home = TEST_HOME / "cluster"
    cluster = LocalKafka(home, TEST_KAFKA_PORT + 2, TEST_KAFKA_PORT + 3, brokers=3)
    cluster.stop()
    cluster.start("apache")
    try:
        settings = make_settings(home=home, kafka_port=TEST_KAFKA_PORT + 2, kafka_controller_port=TEST_KAFKA_PORT + 3,
                                 topic_prefix=f"cluster{uuid.uuid4().hex[:6]}.")
        [result] = await run_faults(settings, ("leader_kill",), runs=1, engine="echo")
    finally:
        cluster.stop()
    assert result.lost == 0 and result.duplicated == 0 and result.feedback_lost == 0, result
    assert result.ratings_match_replay, result
    assert result.resume_s is not None and result.feedback_resume_s is not None, result
