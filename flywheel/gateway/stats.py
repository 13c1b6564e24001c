"""Live statistics of the service, folded from the events the gateway observes.

Pure and synchronous: the observer feeds decoded events in, the dashboard and ``flywheel demo``
read snapshots out. Everything is bounded (ring buffers, fixed histogram buckets) so memory
stays flat however long the service runs.
"""

from __future__ import annotations

import bisect
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

from streams.events import event_time_ms

LATENCY_BUCKETS_MS = (50, 100, 250, 500, 1000, 2500, 5000, 10000, 20000, 40000, 80000)
WINDOW_S = 600  # throughput and ELO series keep the last ten minutes
SLOT_S = 2


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class ServiceStats:
    started_at: float = field(default_factory=time.time)
    served: int = 0
    errors: int = 0
    slo_met: int = 0
    slo_total: int = 0
    by_model: Counter[str] = field(default_factory=Counter)
    latencies_ms: deque[float] = field(default_factory=lambda: deque(maxlen=5000))
    histogram: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS_MS) + 1))
    throughput: deque[tuple[int, int]] = field(default_factory=lambda: deque(maxlen=WINDOW_S // SLOT_S))
    routed: Counter[str] = field(default_factory=Counter)
    elo: dict[str, float] = field(default_factory=dict)
    elo_series: deque[tuple[float, dict[str, float]]] = field(default_factory=lambda: deque(maxlen=300))
    adapters: dict[str, dict[str, Any]] = field(default_factory=dict)
    adapters_published: int = 0
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    trainer_steps: int = 0
    workers: dict[str, dict[str, Any]] = field(default_factory=dict)
    lag: dict[str, int] = field(default_factory=dict)
    feedback: int = 0

    def _tick(self, now: float) -> None:
        slot = int(now // SLOT_S) * SLOT_S
        if self.throughput and self.throughput[-1][0] == slot:
            self.throughput[-1] = (slot, self.throughput[-1][1] + 1)
        else:
            self.throughput.append((slot, 1))

    def on_response(self, event: dict[str, Any], now: float | None = None) -> None:
        now = now or time.time()
        self.served += 1
        if event.get("finish_reason") == "error":
            self.errors += 1
        self.by_model[event["model"]] += 1
        total = float(event["total_ms"])
        self.latencies_ms.append(total)
        self.histogram[bisect.bisect_left(LATENCY_BUCKETS_MS, total)] += 1
        self._tick(now)

    def on_slo(self, met: bool) -> None:
        self.slo_total += 1
        self.slo_met += int(met)

    def on_decision(self, event: dict[str, Any], now: float | None = None) -> None:
        self.routed[event["model"]] += 1
        ratings = {**self.elo, **{c["model"]: round(float(c["global_rating"]), 2) for c in event["candidates"]}}
        if ratings != self.elo:
            self.elo = ratings
            self.elo_series.append((now or time.time(), ratings))

    def _since_start(self, event: dict[str, Any]) -> bool:
        """Whether a state event (read from the topic's beginning) happened during this run."""
        return event_time_ms(event) >= self.started_at * 1000

    def on_adapter(self, event: dict[str, Any]) -> None:
        self.adapters_published += self._since_start(event)
        self.adapters[event["user_id"]] = {"hash": event["adapter_hash"][:12], "version": event["version"],
                                           "rollback": event["rollback"]}

    def on_model(self, event: dict[str, Any]) -> None:
        self.trainer_steps += self._since_start(event)
        self.models[event["model"]] = {"version": event["version"], "step": event["step"]}

    def on_heartbeat(self, event: dict[str, Any], now: float | None = None) -> None:
        self.workers[event["worker_id"]] = {
            "model": event["model"], "model_version": event["model_version"], "healthy": event["healthy"],
            "queue": event["queue_length"], "running": event["running"],
            "tokens_per_s": round(event["tokens_per_s"], 1), "rss_mb": round(event["memory_rss_mb"]),
            "adapters": len(event["loaded_adapters"]), "seen": now or time.time()}

    def snapshot(self, now: float | None = None) -> dict[str, Any]:
        now = now or time.time()
        latencies = list(self.latencies_ms)
        recent = [count for slot, count in self.throughput if slot >= now - 60]
        routed_total = sum(self.routed.values()) or 1
        return {
            "uptime_s": round(now - self.started_at, 1),
            "served": self.served,
            "errors": self.errors,
            "feedback": self.feedback,
            "requests_per_s": round(sum(recent) / 60.0, 3),
            "throughput": [{"t": slot, "n": n} for slot, n in self.throughput],
            "latency_ms": {"p50": round(percentile(latencies, 0.5), 1), "p99": round(percentile(latencies, 0.99), 1)},
            "latency_histogram": {"buckets_ms": list(LATENCY_BUCKETS_MS), "counts": list(self.histogram)},
            "slo_attainment": round(self.slo_met / self.slo_total, 4) if self.slo_total else None,
            "models": dict(self.by_model),
            "routing_shares": {m: round(n / routed_total, 4) for m, n in self.routed.items()},
            "elo": dict(self.elo),
            "elo_series": [{"t": t, "ratings": r} for t, r in self.elo_series],
            "adapters_published": self.adapters_published,
            "adapters": dict(self.adapters),
            "trainer_steps": self.trainer_steps,
            "model_versions": dict(self.models),
            "workers": {w: dict(v, stale=now - v["seen"] > 10) for w, v in self.workers.items()},
            "consumer_lag": dict(self.lag),
        }
