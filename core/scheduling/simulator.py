"""Discrete-event simulation of an iteration-level engine driven by a real scheduling policy.

The simulator replays exactly what the serving loop does (admit arrivals -> ``schedule`` ->
execute -> ``update``), with the engine replaced by a calibrated ``StepCostModel`` and the
output lengths known in advance. Events are arrivals and iteration ends; the clock jumps to the
next arrival whenever nothing can run. Invariants mirrored from the torch engine:

* a joining row's iteration is its prefill, which yields its first token; a preempted row that is
  recomputed prefills its prompt *and* everything it had generated, and yields its next token;
* a row resumed from swap decodes at once (its KV comes back; the copy costs ``swap_s``);
* every row in ``Plan.batch`` computes (a static batch's finished rows are padding);
* the decode window is the largest context among the decoding rows, and a row's context grows
  by one for every iteration it takes part in, padding or not;
* a request rejected or rerouted by admission control gets an outcome at that moment, marked
  with its verdict; a shortened one stops at its new cap.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from core.scheduling.cost import StepCostModel
from core.scheduling.length import LengthDistribution
from core.scheduling.policies import Scheduler, StepResult
from core.scheduling.state import SchedRequest


@dataclass(frozen=True)
class SimRequest:
    request_id: str
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    """True output length (the engine stops the request after this many tokens)."""
    deadline_s: float = math.inf
    slo_class: str = ""
    prompt: str = ""
    """Prompt text, for the length predictor."""
    reroutable: bool = False
    """Another (cheaper) model could take it: admission control may reroute instead of reject."""


@dataclass(frozen=True)
class RequestOutcome:
    request_id: str
    arrival_s: float
    first_token_s: float
    finish_s: float
    output_tokens: int
    deadline_s: float = math.inf
    slo_class: str = ""
    verdict: str = ""
    """Admission control's action on it: "", ``reject``, ``reroute`` or ``shorten``."""
    preemptions: int = 0

    @property
    def latency_s(self) -> float:
        return self.finish_s - self.arrival_s

    @property
    def served(self) -> bool:
        """Answered here (not rejected or rerouted)."""
        return self.verdict not in ("reject", "reroute")

    @property
    def met_slo(self) -> bool:
        """Answered by its deadline (a shortened answer counts; see ``good``)."""
        return self.served and self.finish_s <= self.deadline_s

    @property
    def good(self) -> bool:
        """Answered in full by its deadline: what SLO goodput counts."""
        return self.met_slo and self.verdict == ""


@dataclass(frozen=True)
class Metrics:
    mean_latency_s: float
    """Over served requests (a rejection's quick answer is not a latency); nan if none served."""
    p99_latency_s: float
    slo_attainment: float
    """Share of all requests answered by their deadline (no deadline counts as met)."""
    tokens_per_s: float
    """Output tokens over the makespan (first arrival to last completion)."""
    makespan_s: float
    n: int
    goodput_rps: float = 0.0
    """Requests answered in full within their SLO per second of offered load (``load_window``)."""
    rejected: float = 0.0
    """Share rejected or rerouted by admission control."""
    shortened: float = 0.0
    """Share served with fewer max tokens than asked."""
    preemptions: int = 0

    def as_dict(self) -> dict[str, float]:
        return {"mean_latency_s": self.mean_latency_s, "p99_latency_s": self.p99_latency_s,
                "slo_attainment": self.slo_attainment, "tokens_per_s": self.tokens_per_s,
                "makespan_s": self.makespan_s, "n": float(self.n), "goodput_rps": self.goodput_rps,
                "rejected": self.rejected, "shortened": self.shortened, "preemptions": float(self.preemptions)}


def load_window(outcomes: Sequence[RequestOutcome]) -> float:
    """Seconds of offered load: first to last arrival, or the makespan when all arrive at once.

    Dividing by the arrival span, not the makespan, makes goodput ratios between policies equal to
    ratios of on-time requests: a policy cannot raise its goodput by rejecting to end sooner.
    """
    first = min(o.arrival_s for o in outcomes)
    span = max(o.arrival_s for o in outcomes) - first
    return span if span > 0 else max(max(o.finish_s for o in outcomes) - first, 1e-9)


def summarize(outcomes: Sequence[RequestOutcome]) -> Metrics:
    if not outcomes:
        raise ValueError("summarize() needs at least one outcome")
    served = [o for o in outcomes if o.served]
    lat = np.asarray([o.latency_s for o in served]) if served else np.asarray([math.nan])
    start = min(o.arrival_s for o in outcomes)
    end = max(o.finish_s for o in outcomes)
    span = max(end - start, 1e-9)
    return Metrics(
        mean_latency_s=float(lat.mean()),
        p99_latency_s=float(np.percentile(lat, 99)),
        slo_attainment=float(np.mean([o.met_slo for o in outcomes])),
        tokens_per_s=float(sum(o.output_tokens for o in outcomes) / span),
        makespan_s=float(span),
        n=len(outcomes),
        goodput_rps=float(sum(o.good for o in outcomes) / load_window(outcomes)),
        rejected=float(np.mean([not o.served for o in outcomes])),
        shortened=float(np.mean([o.verdict == "shorten" for o in outcomes])),
        preemptions=sum(o.preemptions for o in outcomes),
    )


def simulate(
    requests: Sequence[SimRequest],
    scheduler: Scheduler,
    cost: StepCostModel,
    *,
    predict: Callable[[SimRequest], float],
    predict_length: Callable[[SimRequest], LengthDistribution | None] | None = None,
    observe: Callable[[SimRequest], None] | None = None,
    max_tokens: int | None = None,
) -> list[RequestOutcome]:
    """Run every request to an outcome; returns outcomes in completion order.

    ``predict`` gives the length estimate the policy sees at arrival, ``predict_length`` (optional)
    the same as a distribution; ``observe`` is called when a request completes (the online
    predictor learns there, as in the serving loop).
    """
    if not requests:
        return []
    pending = sorted(requests, key=lambda r: (r.arrival_s, r.request_id))
    by_id = {r.request_id: r for r in pending}
    if len(by_id) != len(pending):
        raise ValueError("request ids must be unique")
    ctx: dict[str, int] = {}  # tokens in each resident row's KV cache
    first: dict[str, float] = {}
    shortened: set[str] = set()
    outcomes: list[RequestOutcome] = []
    now = pending[0].arrival_s
    nxt = 0
    while len(outcomes) < len(pending):
        while nxt < len(pending) and pending[nxt].arrival_s <= now:
            r = pending[nxt]
            cap = max_tokens if max_tokens is not None else max(r.output_tokens, 1)
            scheduler.add(SchedRequest(
                request_id=r.request_id, arrival_s=r.arrival_s, prompt_tokens=r.prompt_tokens,
                predicted_tokens=max(float(predict(r)), 1.0), max_tokens=cap,
                deadline_s=r.deadline_s, slo_class=r.slo_class,
                length=predict_length(r) if predict_length is not None else None, reroutable=r.reroutable,
            ))
            nxt += 1
        plan = scheduler.schedule(now)
        for v in plan.verdicts:
            src = by_id[v.request_id]
            if v.action == "shorten":
                shortened.add(v.request_id)
                continue
            outcomes.append(RequestOutcome(
                request_id=src.request_id, arrival_s=src.arrival_s, first_token_s=now, finish_s=now,
                output_tokens=0, deadline_s=src.deadline_s, slo_class=src.slo_class, verdict=v.action))
        swapped_tokens = 0
        for rid in plan.preempted:
            req = scheduler.get(rid)
            assert req is not None
            if req.swapped:
                swapped_tokens += ctx[rid]
            else:
                del ctx[rid]  # recompute: the KV is gone
        if plan.is_empty:
            if nxt >= len(pending):
                if plan.verdicts or plan.preempted:
                    continue
                raise RuntimeError(f"{scheduler.name} scheduled nothing with {scheduler.num_waiting} waiting")
            now = max(now, pending[nxt].arrival_s)
            continue
        joining = set(plan.admitted)
        swapped_tokens += sum(ctx[rid] for rid in plan.resumed)
        decoding = [rid for rid in plan.batch if rid not in joining]
        window = max((ctx[rid] + 1 for rid in decoding), default=0)
        prefill_lens = {}
        for rid in plan.admitted:
            req = scheduler.get(rid)
            assert req is not None
            prefill_lens[rid] = req.context_tokens  # prompt, plus generated tokens when recomputed
        max_prompt = max(prefill_lens.values(), default=0)
        now += cost.iteration_s(len(decoding), window, len(plan.admitted), max_prompt) + cost.swap_s(swapped_tokens)
        results: dict[str, StepResult] = {}
        for rid in plan.batch:
            ctx[rid] = prefill_lens[rid] if rid in joining else ctx[rid] + 1
            req = scheduler.get(rid)
            assert req is not None
            if rid not in first:
                first[rid] = now
            target = min(by_id[rid].output_tokens, req.max_tokens)
            if req.generated < target:
                results[rid] = StepResult(new_tokens=1, finished=req.generated + 1 >= target)
            else:  # a finished row kept as padding by a static batch
                results[rid] = StepResult(new_tokens=0, finished=True)
        for req in scheduler.update(plan, results, now):
            src = by_id[req.request_id]
            ctx.pop(req.request_id, None)
            outcomes.append(RequestOutcome(
                request_id=src.request_id, arrival_s=src.arrival_s, first_token_s=first[src.request_id],
                finish_s=now, output_tokens=req.generated, deadline_s=src.deadline_s, slo_class=src.slo_class,
                verdict="shorten" if src.request_id in shortened else "", preemptions=req.preemptions,
            ))
            if observe is not None:
                observe(src)
    return outcomes
