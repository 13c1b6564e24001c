"""Live statistics of the service, folded from the events the gateway observes.

Pure and synchronous: the observer feeds decoded events in, the dashboard and ``flywheel demo``
read snapshots out. Everything is bounded (ring buffers, fixed histogram buckets) so memory
stays flat however long the service runs.

Learning curves are per window of ``CURVE_WINDOW`` responses (or routing decisions) served while
the gateway runs: the mean reward users' feedback gave the responses of each window (the rule of
``core.rewards``, so the curve shows what the trainer is taught; feedback arriving later still
lands in its response's window), and each model's share of each window's routing decisions.
"""

from __future__ import annotations

import bisect
import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

from core.errors import ValidationError
from core.rewards import rewards_from_feedback
from streams.events import event_time_ms

LATENCY_BUCKETS_MS = (50, 100, 250, 500, 1000, 2500, 5000, 10000, 20000, 40000, 80000)
WINDOW_S = 600  # throughput and ELO series keep the last ten minutes
SLOT_S = 2
CURVE_WINDOW = 50  # responses (decisions) per learning-curve point
CURVE_POINTS = 200  # windows kept
REMEMBERED_RESPONSES = 50_000  # request id -> window, so late feedback finds its window


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
    feedback_by_kind: Counter[str] = field(default_factory=Counter)
    reward_windows: deque[list[float]] = field(default_factory=lambda: deque(maxlen=CURVE_POINTS))
    """Per window of responses: [responses, reward sum, rewards counted]."""
    reward_windows_dropped: int = 0
    window_of: OrderedDict[str, int] = field(default_factory=OrderedDict)
    routing_windows: deque[Counter[str]] = field(default_factory=lambda: deque(maxlen=CURVE_POINTS))
    routing_windows_dropped: int = 0
    rewards_by_source: Counter[str] = field(default_factory=Counter)
    dead_letters: Counter[str] = field(default_factory=Counter)
    recent_dead_letters: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=8))
    learners: dict[str, dict[str, int]] = field(default_factory=dict)
    reward_model: dict[str, Any] | None = None

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
        if event.get("finish_reason") != "error":
            self._response_window(str(event["request_id"]))
        total = float(event["total_ms"])
        self.latencies_ms.append(total)
        self.histogram[bisect.bisect_left(LATENCY_BUCKETS_MS, total)] += 1
        self._tick(now)

    def _response_window(self, request_id: str) -> None:
        if not self.reward_windows or self.reward_windows[-1][0] >= CURVE_WINDOW:
            if len(self.reward_windows) == self.reward_windows.maxlen:
                self.reward_windows_dropped += 1
            self.reward_windows.append([0.0, 0.0, 0.0])
        self.reward_windows[-1][0] += 1
        self.window_of[request_id] = self.reward_windows_dropped + len(self.reward_windows) - 1
        while len(self.window_of) > REMEMBERED_RESPONSES:
            self.window_of.popitem(last=False)

    def on_feedback(self, event: dict[str, Any]) -> None:
        """Count it, and credit its rewards to the windows of the responses it is about."""
        self.feedback += 1
        self.feedback_by_kind[str(event["kind"])] += 1
        try:
            assignments = rewards_from_feedback(event)
        except ValidationError:
            return  # the learners dead-letter it; the dashboard counts those
        for assignment in assignments:
            index = self.window_of.get(assignment.request_id)
            if index is None or index < self.reward_windows_dropped:
                continue  # served before this gateway started, or too long ago
            window = self.reward_windows[index - self.reward_windows_dropped]
            window[1] += assignment.reward
            window[2] += 1

    def on_reward(self, event: dict[str, Any]) -> None:
        self.rewards_by_source[str(event["source"])] += 1

    def on_dead_letter(self, event: dict[str, Any]) -> None:
        self.dead_letters[str(event["stage"])] += 1
        self.recent_dead_letters.append({"stage": event["stage"], "origin": event["origin_topic"],
                                         "reason": str(event["reason"])[:300], "t": event_time_ms(event) / 1000})

    def on_slo(self, met: bool) -> None:
        self.slo_total += 1
        self.slo_met += int(met)

    def on_decision(self, event: dict[str, Any], now: float | None = None) -> None:
        self.routed[event["model"]] += 1
        if not self.routing_windows or sum(self.routing_windows[-1].values()) >= CURVE_WINDOW:
            if len(self.routing_windows) == self.routing_windows.maxlen:
                self.routing_windows_dropped += 1
            self.routing_windows.append(Counter())
        self.routing_windows[-1][event["model"]] += 1
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
            "feedback_by_kind": dict(self.feedback_by_kind),
            "learners": {name: dict(v) for name, v in self.learners.items()},
            "dead_letters": dict(self.dead_letters),
            "recent_dead_letters": list(self.recent_dead_letters),
            "rewards_by_source": dict(self.rewards_by_source),
            "reward_model": dict(self.reward_model) if self.reward_model is not None else None,
            "learning": self.curves(),
        }

    def curves(self) -> dict[str, Any]:
        """Mean feedback reward per window of responses; routing share per window of decisions.
        ``at`` is the number of responses (decisions) served up to the end of the window."""
        reward = []
        for i, (n, total, count) in enumerate(self.reward_windows):
            at = (self.reward_windows_dropped + i) * CURVE_WINDOW + int(n)
            reward.append({"at": at, "mean": round(total / count, 4) if count else None, "rated": int(count)})
        routing = []
        for i, counts in enumerate(self.routing_windows):
            n = sum(counts.values())
            routing.append({"at": (self.routing_windows_dropped + i) * CURVE_WINDOW + n,
                            "shares": {m: round(c / n, 4) for m, c in sorted(counts.items())}})
        return {"window": CURVE_WINDOW, "reward": reward, "routing": routing}
