"""The dashboard's and demo's counters count what happened during this run, not the topics' history."""

from __future__ import annotations

from flywheel.gateway.stats import ServiceStats


def adapter(event_time_ms: int, version: int) -> dict:
    return {"event_time": event_time_ms, "user_id": "u", "adapter_hash": "a" * 64, "version": version,
            "rollback": False}


def test_state_events_before_the_run_set_state_but_are_not_counted():
    stats = ServiceStats(started_at=1000.0)
    stats.on_adapter(adapter(999_000, 1))
    stats.on_model({"event_time": 999_000, "model": "m", "version": "v1", "step": 1})
    assert stats.adapters_published == 0 and stats.trainer_steps == 0
    assert stats.adapters["u"]["version"] == 1 and stats.models["m"]["version"] == "v1"
    stats.on_adapter(adapter(1_000_500, 2))
    stats.on_model({"event_time": 1_000_500, "model": "m", "version": "v2", "step": 2})
    assert stats.adapters_published == 1 and stats.trainer_steps == 1
    assert stats.adapters["u"]["version"] == 2 and stats.models["m"]["step"] == 2
