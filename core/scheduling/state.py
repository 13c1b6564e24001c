"""Request lifecycle as data: the states a scheduled request moves through and the legal moves.

    WAITING ──> RUNNING ──> FINISHED
       ^  │        │  └───> HELD ──> FINISHED      (static batching: done, held by its batch)
       │  │        └──> WAITING                   (preempted: KV freed or swapped, resumes later)
       │  └───────────┴─────────┴─────> ABORTED   (incl. rejected by admission control)

``HELD`` exists because request-level (static) batching returns a batch only when its longest
member finishes (Orca, OSDI'22, §2): a sequence that hit EOS early keeps its slot, and its
compute is padding, until the whole batch completes. Continuous policies never use it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum

from core.scheduling.length import LengthDistribution


class RequestStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    HELD = "held"
    FINISHED = "finished"
    ABORTED = "aborted"

    @property
    def is_done(self) -> bool:
        return self in (RequestStatus.FINISHED, RequestStatus.ABORTED)


_TRANSITIONS: dict[RequestStatus, frozenset[RequestStatus]] = {
    RequestStatus.WAITING: frozenset({RequestStatus.RUNNING, RequestStatus.ABORTED}),
    RequestStatus.RUNNING: frozenset({RequestStatus.FINISHED, RequestStatus.HELD, RequestStatus.ABORTED,
                                      RequestStatus.WAITING}),
    RequestStatus.HELD: frozenset({RequestStatus.FINISHED, RequestStatus.ABORTED}),
    RequestStatus.FINISHED: frozenset(),
    RequestStatus.ABORTED: frozenset(),
}


def is_transition_valid(src: RequestStatus, dst: RequestStatus) -> bool:
    """Whether a request may move from ``src`` to ``dst``."""
    return dst in _TRANSITIONS[src]


@dataclass(eq=False)
class SchedRequest:
    """What a policy knows about one request. Mutated only by the policy that owns it; compared by
    identity (a request is one object from arrival to completion).

    Invariant: ``generated`` counts tokens the engine has produced for this request, and only
    ``RUNNING`` requests gain tokens.
    """

    request_id: str
    arrival_s: float
    """When the request arrived (the clock of whoever drives the policy)."""
    prompt_tokens: int
    predicted_tokens: float
    """Predicted output length (tokens) from the length predictor, > 0."""
    max_tokens: int
    """Hard cap on output length the engine enforces."""
    deadline_s: float = math.inf
    """Absolute time by which the final response is due; ``inf`` means no SLO."""
    slo_class: str = ""
    generated: int = 0
    status: RequestStatus = RequestStatus.WAITING
    admitted_s: float | None = None
    """When the policy first put the request into a batch."""
    finished_s: float | None = field(default=None)
    length: LengthDistribution | None = None
    """Predicted output length as a distribution; None = the point ``predicted_tokens``."""
    preemptions: int = 0
    """Times the request was taken out of the engine to free KV memory."""
    swapped: bool = False
    """Preempted by swapping its KV out (resumes without a prefill); False = recompute."""
    note: str = ""
    """Why admission control changed the request (e.g. fewer max tokens); "" = served as asked."""
    reroutable: bool = False
    """A cheaper model may take this request if it cannot meet its deadline here."""
    _quantiles: dict[tuple[int, int, float], float] = field(default_factory=dict, repr=False, compare=False)

    def transition(self, dst: RequestStatus) -> None:
        if not is_transition_valid(self.status, dst):
            raise ValueError(f"request {self.request_id!r}: invalid transition "
                             f"{self.status.value} -> {dst.value}")
        self.status = dst

    @property
    def context_tokens(self) -> int:
        """Tokens currently in this request's KV cache (prompt plus generated)."""
        return self.prompt_tokens + self.generated

    def remaining_estimate(self) -> float:
        """Predicted tokens still to generate, never below 1.

        Once a request outlives its prediction, the prediction is known to be wrong; with
        power-of-two length buckets the natural guess is that it doubles, so the estimate
        becomes ``generated`` more tokens (capped by ``max_tokens``).
        """
        cap = max(self.max_tokens - self.generated, 1)
        if self.generated < self.predicted_tokens:
            return float(min(max(self.predicted_tokens - self.generated, 1.0), cap))
        return float(min(max(self.generated, 1), cap))

    def remaining_quantile(self, q: float) -> float:
        """The q-quantile of the tokens still to come (conditioned on what has been generated)."""
        if self.length is None:
            return self.remaining_estimate()
        key = (self.generated, self.max_tokens, q)
        value = self._quantiles.get(key)
        if value is None:
            if len(self._quantiles) > 64:  # only the current ``generated`` is ever asked again
                self._quantiles.clear()
            value = self._quantiles[key] = self.length.remaining_quantile(self.generated, q, cap=self.max_tokens)
        return value
