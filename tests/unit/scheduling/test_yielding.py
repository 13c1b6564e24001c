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


async def test_the_watcher_holds_a_learner_back_while_serving_is_busy_and_lets_it_go_when_quiet() -> None:
    import time

    from infra.yielding import ServingPressureWatcher

    watcher = ServingPressureWatcher(services=None, config=BackoffConfig(max_wait_s=0.3, poll_s=0.05))  # type: ignore[arg-type]
    assert await watcher.wait_for_quiet() == 0.0  # nobody serving: no wait at all
    watcher.pressure.on_heartbeat(_beat("w", 1, 2), time.time())
    waited = await watcher.wait_for_quiet()
    assert waited >= 0.3  # busy the whole time: held back exactly as long as the bound allows
    assert watcher.waited_s == waited


def test_background_processes_lower_their_own_priority() -> None:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", "import os; from infra.yielding import run_as_background; "
                          "print(os.getpriority(os.PRIO_PROCESS, 0), run_as_background(7), run_as_background(3))"],
                         capture_output=True, text=True, check=True)
    base, first, second = map(int, out.stdout.split())
    assert first == second == max(base, 7)  # raised to 7, never lowered again
