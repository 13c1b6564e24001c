"""Learning yields to serving: the back-off rule over worker heartbeats."""

import pytest

from core.scheduling.yielding import BackoffConfig, ServingPressure


def _beat(worker: str, queue: int, running: int, healthy: bool = True) -> dict:
    return {"worker_id": worker, "queue_length": queue, "running": running, "healthy": healthy}


def test_learning_waits_while_live_workers_hold_requests_but_never_longer_than_the_bound() -> None:
    p = ServingPressure(BackoffConfig(max_wait_s=20.0, stale_s=10.0))
    assert not p.busy(100.0)  # no workers known: nothing to yield to
    p.on_heartbeat(_beat("w1", 0, 0), 100.0)
    p.on_heartbeat(_beat("w2", 2, 3), 100.0)
    assert p.held(100.0) == 5 and p.busy(100.0)
    assert p.should_wait(100.0, waited_s=5.0)
    assert not p.should_wait(100.0, waited_s=20.0)  # bounded: learning is delayed, not starved
    p.on_heartbeat(_beat("w2", 0, 0), 101.0)
    assert not p.should_wait(101.0, waited_s=0.0)


def test_stale_and_unhealthy_workers_do_not_hold_learning_back() -> None:
    p = ServingPressure(BackoffConfig(stale_s=10.0))
    p.on_heartbeat(_beat("dead", 4, 4), 0.0)
    assert p.busy(5.0) and not p.busy(11.0)
    p.on_heartbeat(_beat("sick", 4, 4, healthy=False), 20.0)
    assert not p.busy(20.0)
    with pytest.raises(ValueError, match="stale_s=0"):
        BackoffConfig(stale_s=0)
