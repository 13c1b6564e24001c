"""``slo_goodput``: a continuous-batching policy that maximises requests finished within their SLO.

FCFS collapses under overload because it spends the engine on requests that will be late anyway
and makes everyone behind them late too (SCORPIO, arXiv 2505.23022). This policy combines:

* **Lengths as distributions** (TIE, arXiv 2604.00499). A request's remaining output is
  ``SchedRequest.length`` conditioned on what it has generated; finishing times use its
  ``finish_quantile`` (the median by default), memory reservations its ``reserve_quantile``.
* **Deadline-aware admission control** (``_screen``). A waiting request that could not finish by
  its deadline even if it joined the batch right now is hopeless. It is shortened to the tokens
  that still fit (if ``shorten_min_tokens`` allows), else handed to a cheaper model when it is
  ``reroutable``, else rejected now with the reason. A request already admitted is never
  rejected: it is answered even when late.
* **Priorities by SLO class without starvation.** Waiting requests are ordered by class (most
  urgent first), then deadline, then arrival; every ``aging_s`` seconds of waiting promotes a
  request by one class, so a steady stream of urgent work cannot starve the least urgent class.
* **SLO guard.** A request joins only if every running request that is on track stays on track
  with one more row (a decode step slows down with every row).
* **Memory-aware admission and preemption.** A request joins only if the KV of its prompt plus the
  ``reserve_quantile`` of its length fits the ledger beside what the running rows are predicted to
  grow to; when a running row cannot grow anyway (a misprediction), the victim is a request that
  is already late, else the least urgent, latest-deadline one.
"""

from __future__ import annotations

import math

from core.scheduling.policies import POLICIES, Scheduler, Verdict
from core.scheduling.state import SchedRequest


class SloGoodput(Scheduler):
    name = "slo_goodput"

    # --- priorities ---------------------------------------------------------------------------
    def class_rank(self, req: SchedRequest, now: float) -> float:
        """0 = most urgent class; one rank better for every ``aging_s`` spent waiting."""
        classes = self.config.slo_classes
        base = classes.index(req.slo_class) if req.slo_class in classes else (len(classes) - 1) / 2
        waited = max(now - req.arrival_s, 0.0)
        return base - math.floor(waited / self.config.aging_s)

    def _key(self, req: SchedRequest, now: float) -> tuple[float, float, float]:
        return (self.class_rank(req, now), req.deadline_s, req.arrival_s)

    def _order(self, now: float) -> list[SchedRequest]:
        # Preempted requests were admitted once: they resume before anything new joins.
        return sorted(self.waiting.values(), key=lambda r: (r.admitted_s is None, *self._key(r, now)))

    # --- predictions ----------------------------------------------------------------------------
    def _remaining(self, req: SchedRequest) -> float:
        return req.remaining_quantile(self.config.finish_quantile)

    def _final_ctx(self, req: SchedRequest) -> float:
        return req.context_tokens + self._remaining(req)

    def finish_estimate(self, req: SchedRequest, now: float, rows: int, window: float) -> float:
        """When ``req`` finishes if it (re)joins or keeps running now at ``rows`` rows."""
        step = self.cost.decode_s(rows, int(window))
        running = req in self.running
        prefill = 0.0 if running else self.cost.prefill_s(1, req.context_tokens)
        # A joining row's prefill yields its first token: one decode step fewer.
        steps = self._remaining(req) - (0 if running else 1)
        return now + prefill + max(steps, 0.0) * step + self.cost.overhead_s * max(steps, 1.0)

    def _window(self, members: list[SchedRequest]) -> float:
        return max((self._final_ctx(r) for r in members), default=0.0)

    # --- admission control ------------------------------------------------------------------------
    def _screen(self, now: float) -> list[Verdict]:
        cfg = self.config
        if not cfg.admission_control:
            return []
        verdicts: list[Verdict] = []
        rows = min(len(self.running) + 1, cfg.max_batch)
        window = self._window(self.running)
        for req in list(self.waiting.values()):
            if math.isinf(req.deadline_s) or req.admitted_s is not None:
                continue  # no SLO, or admitted once (preempted): always answered
            w = max(window, self._final_ctx(req))
            finish = self.finish_estimate(req, now, rows, w)
            if finish <= req.deadline_s:
                continue
            late_by = finish - req.deadline_s
            verdicts.append(self._verdict(req, now, rows, w, late_by))
        return verdicts

    def _verdict(self, req: SchedRequest, now: float, rows: int, window: float, late_by: float) -> Verdict:
        cfg = self.config
        step = self.cost.decode_s(rows, int(window)) + self.cost.overhead_s
        budget = req.deadline_s - now - self.cost.prefill_s(1, req.context_tokens)
        fits = int(budget // step) + 1 if budget > 0 else 0  # the prefill yields the first token
        why = (f"cannot meet its deadline: predicted to finish {late_by:.1f} s late "
               f"({self._remaining(req):.0f} tokens at {1000 * step:.0f} ms per step with {rows} rows)")
        if cfg.shorten_min_tokens and not req.note and cfg.shorten_min_tokens <= fits < req.max_tokens:
            req.note = f"shortened to {fits} tokens: {why}"
            req.max_tokens = fits
            return Verdict(req.request_id, "shorten", req.note, max_tokens=fits)
        if req.reroutable:
            return Verdict(req.request_id, "reroute", f"rerouted to a cheaper model: {why}")
        return Verdict(req.request_id, "reject", f"rejected: {why}")

    # --- admission ------------------------------------------------------------------------------
    def _grown_blocks(self, members: list[SchedRequest]) -> int:
        """Blocks the running rows are predicted to need beyond what they hold now."""
        q = self.config.reserve_quantile
        extra = 0
        for r in members:
            final = r.context_tokens + r.remaining_quantile(q)
            extra += max(self.ledger.blocks_for(final) - self.ledger.held(r.request_id), 0)
        return extra

    def _admit(self, now: float) -> list[SchedRequest]:
        cfg = self.config
        ledger = self.ledger
        chosen: list[SchedRequest] = []
        members = [r for r in self.running]
        window = self._window(members)
        promised = self._grown_blocks(members) if ledger.budget.limited else 0
        for req in self._order(now):
            rows = len(members)
            if rows >= cfg.max_batch or not self._fits_prefill(chosen, req):
                break
            if ledger.budget.limited:
                reserve = 0.0 if req.swapped else req.remaining_quantile(cfg.reserve_quantile)
                need = ledger.blocks_for(req.context_tokens + 1 + reserve)
                # An empty engine always takes its first request (a fit-check cannot deadlock it).
                if members and need + promised > ledger.free - ledger.budget.watermark_blocks:
                    break
                if not self._kv_fits(req, taken=sum(self._blocks_to_join(r) for r in chosen)):
                    break
            new_window = max(window, self._final_ctx(req))
            if cfg.protect_slo and not self._keeps_slos(members, now, rows, window, new_window):
                break
            chosen.append(req)
            members.append(req)
            window = new_window
            if ledger.budget.limited:
                promised += need
        return chosen

    def _keeps_slos(self, members: list[SchedRequest], now: float, rows: int, window: float,
                    new_window: float) -> bool:
        for m in members:
            if math.isinf(m.deadline_s):
                continue
            on_track = self.finish_estimate(m, now, max(rows, 1), window) <= m.deadline_s
            if on_track and self.finish_estimate(m, now, rows + 1, new_window) > m.deadline_s:
                return False
        return True

    # --- preemption -----------------------------------------------------------------------------
    def _victims(self, now: float) -> list[SchedRequest]:
        """Already-late requests first, then the least urgent class, the latest deadline, the latest
        admitted."""
        rows = len(self.running)
        window = self._window(self.running)

        def key(r: SchedRequest) -> tuple[bool, float, float, float]:
            late = self.finish_estimate(r, now, rows, window) > r.deadline_s
            return (not late, -self.class_rank(r, now), -r.deadline_s, -(r.admitted_s or 0.0))

        return sorted(self.running, key=key)


POLICIES[SloGoodput.name] = SloGoodput
