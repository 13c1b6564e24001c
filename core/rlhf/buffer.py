"""Rollouts waiting for their rewards, and the off-policy rules that decide which may train.

The trainer consumes two streams: Rollouts (token ids and the *behaviour* log-probs of the
policy version that produced them) and Rewards (one scalar per request id, from user feedback or
from the rewarder's reward model). ``RolloutBuffer`` joins them in any order and hands out full
batches. It never invents a reward: a rollout whose reward does not arrive within
``reward_timeout_s`` is dropped and counted (``expired_unrewarded``).

Off-policy rules (``OffPolicyConfig``; the PPO update uses each rollout's behaviour log-probs as
the "old" log-probs, so its clipped ratio ``pi_theta / pi_behaviour`` is the importance weight):

- **staleness bound**: a rollout produced by a version older than the newest ``max_staleness + 1``
  versions is dropped, when it arrives and again when a batch is taken (it may have aged while
  waiting for its reward). Beyond a few versions the clipped ratio stops carrying gradient for
  most tokens and the sample only costs compute;
- **adapter-served samples** (``adapter_version`` set: the behaviour policy was base + a user's
  adapter, not the base being trained) are excluded by default (``adapter_rollouts="exclude"``).
  With ``"correct"`` they are kept and their behaviour log-probs enter the ratio like any other
  off-policy sample's, so the clip bounds how far one such sample can move the base;
- **sampling regime**: the behaviour log-probs workers report are those of the temperature-1
  policy (what PPO trains). A response sampled at temperature 1 without nucleus truncation is an
  exact sample of it; greedy, tempered or nucleus samples are not, and their ratio is then a
  trust-region measure rather than an unbiased importance weight. ``sampled_only=True`` keeps only
  the exact samples.

Pure: no torch, no I/O. Time comes from the caller.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Literal

AdapterPolicy = Literal["exclude", "correct"]


@dataclass(frozen=True)
class Rollout:
    """One served (or trainer-generated) response, as the trainer consumes it."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    response_token_ids: tuple[int, ...]
    response_logprobs: tuple[float, ...]
    """Behaviour-policy log-probs (temperature 1) reported by whoever generated the response."""
    model_version: str
    prompt: str = ""
    response: str = ""
    user_id: str = ""
    created_at: float = 0.0
    """Seconds on the trainer's clock when the rollout arrived (set by ``RolloutBuffer.add``)."""
    adapter_version: str | None = None
    """Hash of the user adapter (or mixture) that served it; None: the base model alone."""
    temperature: float = 1.0
    top_p: float = 1.0
    source: str = "live"
    """``live`` (a worker served it) or ``trainer`` (the trainer generated it from a live prompt)."""

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise ValueError(f"rollout {self.request_id!r} has an empty prompt")
        if not self.response_token_ids:
            raise ValueError(f"rollout {self.request_id!r} has an empty response")
        if len(self.response_logprobs) != len(self.response_token_ids):
            raise ValueError(
                f"rollout {self.request_id!r}: {len(self.response_logprobs)} log-probs for "
                f"{len(self.response_token_ids)} response tokens"
            )

    @property
    def exact_sample(self) -> bool:
        """Sampled from the temperature-1 policy itself (its log-probs are true behaviour log-probs)."""
        return self.temperature == 1.0 and self.top_p >= 1.0


@dataclass(frozen=True)
class OffPolicyConfig:
    """Which rollouts may train the base policy, and for how long they wait for a reward."""

    max_staleness: int | None = 4
    """Keep rollouts of the newest ``max_staleness + 1`` versions (None: any version)."""
    adapter_rollouts: AdapterPolicy = "exclude"
    """``exclude`` adapter-served samples, or ``correct`` them with their behaviour log-probs."""
    sampled_only: bool = False
    """Keep only exact temperature-1 samples (see the module docstring)."""
    reward_timeout_s: float = 300.0
    """A rollout with no reward after this long is dropped and counted (never scored otherwise)."""
    max_early_rewards: int = 100_000
    """Rewards whose rollout has not arrived yet are kept up to this many (oldest dropped)."""

    def __post_init__(self) -> None:
        if self.max_staleness is not None and self.max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0 or None, got {self.max_staleness}")
        if self.adapter_rollouts not in ("exclude", "correct"):
            raise ValueError(f"adapter_rollouts must be 'exclude' or 'correct', got {self.adapter_rollouts!r}")
        if self.reward_timeout_s < 0 or self.max_early_rewards < 0:
            raise ValueError(
                f"reward_timeout_s and max_early_rewards must be >= 0, got {self.reward_timeout_s}, "
                f"{self.max_early_rewards}"
            )


COUNTERS = (
    "rollouts",
    "duplicates",
    "stale_dropped",
    "adapter_excluded",
    "inexact_excluded",
    "expired_unrewarded",
    "early_rewards_dropped",
    "rewards",
)


@dataclass
class RolloutBuffer:
    """Joins rollouts with rewards; ``take`` hands out the oldest rewarded rollouts."""

    config: OffPolicyConfig = field(default_factory=OffPolicyConfig)
    versions: list[str] = field(default_factory=lambda: ["base"])
    """Published versions, oldest first; the newest is what the trainer trains now."""
    pending: OrderedDict[str, Rollout] = field(default_factory=OrderedDict)
    """Rollouts waiting for their reward, in arrival order."""
    early_rewards: OrderedDict[str, float] = field(default_factory=OrderedDict)
    """Rewards that arrived before their rollout."""
    ready: list[tuple[Rollout, float]] = field(default_factory=list)
    """Rewarded rollouts, in the order they became ready."""
    counters: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))

    @property
    def version(self) -> str:
        return self.versions[-1]

    def held(self) -> set[str]:
        """Request ids the buffer still holds (their events are not finished yet)."""
        return set(self.pending) | set(self.early_rewards) | {r.request_id for r, _ in self.ready}

    def is_fresh(self, model_version: str) -> bool:
        limit = self.config.max_staleness
        return limit is None or model_version in self.versions[-(limit + 1) :]

    def admissible(self, rollout: Rollout) -> str | None:
        """Why this rollout may not train the base policy (the counter to bump), or None."""
        if rollout.adapter_version and self.config.adapter_rollouts == "exclude":
            return "adapter_excluded"
        if self.config.sampled_only and not rollout.exact_sample:
            return "inexact_excluded"
        if not self.is_fresh(rollout.model_version):
            return "stale_dropped"
        return None

    def add(self, rollout: Rollout, now: float) -> bool:
        """Buffer a rollout; False if it was dropped (duplicate or inadmissible; counted)."""
        rid = rollout.request_id
        if rid in self.pending or any(r.request_id == rid for r, _ in self.ready):
            self.counters["duplicates"] += 1
            return False
        reason = self.admissible(rollout)
        if reason is not None:
            self.counters[reason] += 1
            self.early_rewards.pop(rid, None)  # its reward has nothing to join any more
            return False
        self.counters["rollouts"] += 1
        stamped = rollout if rollout.created_at else replace(rollout, created_at=now)
        if rid in self.early_rewards:
            self.ready.append((stamped, self.early_rewards.pop(rid)))
        else:
            self.pending[rid] = stamped
        return True

    def add_reward(self, request_id: str, reward: float) -> None:
        """Attach a reward (the first one wins; later ones for the same request are ignored)."""
        self.counters["rewards"] += 1
        rollout = self.pending.pop(request_id, None)
        if rollout is not None:
            self.ready.append((rollout, reward))
            return
        if request_id in self.early_rewards or any(r.request_id == request_id for r, _ in self.ready):
            return
        self.early_rewards[request_id] = reward
        while len(self.early_rewards) > self.config.max_early_rewards:
            self.early_rewards.popitem(last=False)
            self.counters["early_rewards_dropped"] += 1

    def expire(self, now: float) -> list[str]:
        """Drop (and count) rollouts that waited ``reward_timeout_s`` without a reward."""
        timeout = self.config.reward_timeout_s
        expired = [rid for rid, r in self.pending.items() if now - r.created_at >= timeout]
        for rid in expired:
            del self.pending[rid]
        self.counters["expired_unrewarded"] += len(expired)
        return expired

    def drop_stale(self) -> list[str]:
        """Drop rewarded and pending rollouts that aged past the staleness bound while waiting."""
        dropped = [r.request_id for r, _ in self.ready if not self.is_fresh(r.model_version)]
        dropped += [rid for rid, r in self.pending.items() if not self.is_fresh(r.model_version)]
        if dropped:
            gone = set(dropped)
            self.ready = [(r, s) for r, s in self.ready if r.request_id not in gone]
            for rid in gone:
                self.pending.pop(rid, None)
            self.counters["stale_dropped"] += len(dropped)
        return dropped

    def n_ready(self) -> int:
        return len(self.ready)

    def take(self, n: int) -> list[tuple[Rollout, float]]:
        """The oldest ``n`` rewarded rollouts (after dropping stale ones); raises if fewer."""
        self.drop_stale()
        if len(self.ready) < n:
            raise ValueError(f"need {n} rewarded rollouts, have {len(self.ready)}")
        taken, self.ready = self.ready[:n], self.ready[n:]
        return taken

    def published(self, version: str) -> None:
        """A new version is live: it becomes the newest, older ones age by one."""
        self.versions.append(version)

    def restore_versions(self, versions: Iterable[str]) -> None:
        """Resume: the versions published so far, oldest first."""
        self.versions = list(versions) or ["base"]
