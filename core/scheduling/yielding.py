"""Learning yields to serving: the pure rule background learners follow.

Workers publish how many requests they hold (waiting + running) in every heartbeat, and an early
heartbeat whenever that count goes from zero to non-zero or back. A background learner (the PPO
trainer, the personaliser's adapter updates) folds those heartbeats into ``ServingPressure`` and,
before each unit of learning work, waits while any live worker holds requests, for at most
``max_wait_s``, so serving never starves learning for good (trainer steps and adapters still land
under steady traffic, just later). A worker whose heartbeat is older than ``stale_s`` is ignored:
a dead worker must not stop learning. The OS-level half of the mechanism, lower CPU priority for
the learner's process, lives with the process (``infra.yielding``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class BackoffConfig:
    max_wait_s: float = 20.0
    """Longest a unit of learning waits for serving to go quiet."""
    stale_s: float = 10.0
    """Heartbeats older than this are ignored."""
    poll_s: float = 0.2
    """How often a waiting learner re-checks."""

    def __post_init__(self) -> None:
        if self.max_wait_s < 0 or self.stale_s <= 0 or self.poll_s <= 0:
            raise ValueError(f"max_wait_s={self.max_wait_s} must be >= 0, stale_s={self.stale_s} and "
                             f"poll_s={self.poll_s} > 0")


@dataclass
class ServingPressure:
    """Requests held per worker, from heartbeats."""

    config: BackoffConfig = field(default_factory=BackoffConfig)
    workers: dict[str, tuple[int, float]] = field(default_factory=dict)
    """worker id -> (requests waiting or running, when the heartbeat was produced)."""

    def on_heartbeat(self, event: dict[str, Any], seen_s: float) -> None:
        held = int(event.get("queue_length", 0)) + int(event.get("running", 0))
        if not event.get("healthy", True):
            held = 0
        self.workers[event["worker_id"]] = (held, seen_s)

    def held(self, now_s: float) -> int:
        """Requests held by live workers."""
        return sum(n for n, seen in self.workers.values() if now_s - seen <= self.config.stale_s)

    def busy(self, now_s: float) -> bool:
        return self.held(now_s) > 0

    def should_wait(self, now_s: float, waited_s: float) -> bool:
        """Whether a learner that has already waited ``waited_s`` should keep waiting."""
        return self.busy(now_s) and waited_s < self.config.max_wait_s
