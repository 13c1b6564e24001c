"""The SLO-goodput policy on hand-built queues: admission verdicts, class priorities with aging,
the SLO guard, memory-aware admission and preemption on misprediction.

Costs (``factories.COST``): a decode step takes 10 ms + 1 ms per row; a prefill 5 ms + 0.01 ms per
padded token.
"""

import dataclasses

import pytest

from core.scheduling.kv import KvBudget
from core.scheduling.length import LengthDistribution
from core.scheduling.policies import SchedulerConfig, make_scheduler
from core.scheduling.state import RequestStatus
from tests.unit.scheduling.factories import COST, make_request, step

CFG = SchedulerConfig(max_batch=4)


def _goodput(cfg: SchedulerConfig = CFG):
    return make_scheduler("slo_goodput", cfg, COST)


def test_a_request_that_cannot_meet_its_deadline_is_rejected_at_once_with_the_reason() -> None:
    s = _goodput()
    # 100 tokens need ~5 ms + 99 x 11 ms = 1.1 s alone; a 0.5 s deadline is hopeless.
    s.add(make_request("late", predicted=100, deadline=0.5))
    s.add(make_request("fine", predicted=10, deadline=5.0))
    plan = s.schedule(0.0)
    assert [(v.request_id, v.action) for v in plan.verdicts] == [("late", "reject")]
    assert "predicted to finish" in plan.verdicts[0].reason and "late" in plan.verdicts[0].reason
    assert plan.batch == ("fine",) and s.get("late") is None


def test_hopeless_requests_are_rerouted_when_a_cheaper_model_may_take_them_or_shortened_when_allowed() -> None:
    s = _goodput(dataclasses.replace(CFG, shorten_min_tokens=8))
    rerouted = make_request("reroute", predicted=100, deadline=0.05)  # too tight to shorten usefully
    rerouted.reroutable = True
    s.add(rerouted)
    s.add(make_request("shorten", predicted=100, max_tokens=100, deadline=0.5))
    plan = s.schedule(0.0)
    verdicts = {v.request_id: v for v in plan.verdicts}
    assert verdicts["reroute"].action == "reroute" and "cheaper model" in verdicts["reroute"].reason
    short = verdicts["shorten"]
    assert short.action == "shorten" and short.max_tokens is not None and 8 <= short.max_tokens < 100
    req = s.get("shorten")
    assert req is not None and req.max_tokens == short.max_tokens and req.note.startswith("shortened to")
    assert plan.batch == ("shorten",)  # it stays and is served with the smaller cap


def test_admitted_requests_are_never_rejected_even_when_they_turn_out_late() -> None:
    s = _goodput()
    s.add(make_request("a", predicted=5, deadline=0.2))
    step(s, 0.0, {"a": 1000})  # the prediction was far too short
    plan, _ = step(s, 5.0, {"a": 1000})  # way past its deadline, still served
    assert plan.batch == ("a",) and not plan.verdicts


def test_classes_order_the_queue_and_aging_prevents_starvation() -> None:
    cfg = dataclasses.replace(CFG, max_batch=1, aging_s=10.0, admission_control=False)
    s = _goodput(cfg)
    s.add(dataclasses.replace(make_request("old-batch", arrival=0.0), slo_class="batch"))
    s.add(dataclasses.replace(make_request("std", arrival=1.0, deadline=50.0), slo_class="standard"))
    s.add(dataclasses.replace(make_request("urgent", arrival=2.0, deadline=60.0), slo_class="interactive"))
    assert s.schedule(2.0).batch == ("urgent",)  # most urgent class first, whatever the arrival
    step(s, 2.0, {"urgent": 1})
    assert s.schedule(12.0).batch == ("std",)  # both aged one class: std is still ahead
    step(s, 12.0, {"std": 1})
    s.add(dataclasses.replace(make_request("new-urgent", arrival=31.0, deadline=40.0), slo_class="interactive"))
    # Three classes of aging in 31 s: the batch request now outranks a fresh interactive one.
    assert s.schedule(31.0).batch == ("old-batch",)


def test_the_slo_guard_keeps_running_requests_on_track() -> None:
    s = _goodput(dataclasses.replace(CFG, admission_control=False))
    # "tight" alone: 100 steps at 11 ms = 1.1 s, just inside its 1.16 s deadline; one more row
    # makes each step 12 ms and it would miss.
    s.add(make_request("tight", predicted=100, deadline=1.16))
    s.add(make_request("loose", predicted=100, deadline=100.0, arrival=0.5))
    plan = s.schedule(0.0)
    assert plan.batch == ("tight",)
    step(s, 0.0, {"tight": 100})
    plan = s.schedule(0.01)
    assert "loose" not in plan.batch


def test_memory_aware_admission_reserves_the_likely_length() -> None:
    cfg = dataclasses.replace(CFG, kv=KvBudget(block_tokens=10, total_blocks=10), reserve_quantile=0.9,
                              admission_control=False)
    s = _goodput(cfg)
    for rid in ("a", "b"):
        req = make_request(rid, prompt=10, predicted=40, max_tokens=60)
        req.length = LengthDistribution(((30.0, 50.0, 1.0),))
        s.add(req)
    # Each needs 10 prompt + ~48 (90th percentile) tokens = 6 blocks: only one fits in 10.
    assert s.schedule(0.0).batch == ("a",)
    fcfs = make_scheduler("fcfs_continuous", cfg, COST)
    for rid in ("a", "b"):
        fcfs.add(make_request(rid, prompt=10, predicted=40, max_tokens=60))
    assert fcfs.schedule(0.0).batch == ("a", "b")  # vLLM's rule: the prompts fit, admit


def test_a_misprediction_preempts_the_least_urgent_request_and_it_resumes_by_recompute() -> None:
    cfg = dataclasses.replace(CFG, kv=KvBudget(block_tokens=4, total_blocks=6), reserve_quantile=0.01,
                              admission_control=False)
    s = _goodput(cfg)
    s.add(dataclasses.replace(make_request("urgent", prompt=4, predicted=2, deadline=10.0, max_tokens=16),
                              slo_class="interactive"))
    s.add(dataclasses.replace(make_request("batch", prompt=4, predicted=2, deadline=90.0, max_tokens=16),
                              slo_class="batch"))
    lengths = {"urgent": 12, "batch": 12}  # both run far past their 2-token predictions
    preempted_at = None
    for i in range(40):
        plan, _ = step(s, float(i), lengths)
        if plan.preempted:
            preempted_at = i
            assert plan.preempted == ("batch",)
            assert s.get("batch").status is RequestStatus.WAITING
            break
    assert preempted_at is not None
    victim = s.get("batch")
    assert victim is not None and victim.preemptions == 1 and victim.generated > 0
    while s.get("urgent") is not None:
        plan, _ = step(s, 100.0, lengths)
    plan, _ = step(s, 101.0, lengths)
    assert plan.admitted == ("batch",)  # back by recompute: prompt and generated tokens prefilled
    assert s.ledger.held("batch") == s.ledger.blocks_for(victim.context_tokens)


def test_swap_preemption_resumes_without_a_prefill() -> None:
    cfg = dataclasses.replace(CFG, kv=KvBudget(block_tokens=4, total_blocks=6, swap_blocks=6),
                              preemption="swap", reserve_quantile=0.01, admission_control=False)
    s = make_scheduler("fcfs_continuous", cfg, COST)
    s.add(make_request("a", prompt=4, predicted=2, max_tokens=16))
    s.add(make_request("b", prompt=4, predicted=2, max_tokens=16))
    lengths = {"a": 12, "b": 12}
    for i in range(40):
        plan, _ = step(s, float(i), lengths)
        if plan.preempted:
            assert plan.preempted == ("b",)  # vLLM preempts the most recently admitted
            break
    assert s.get("b").swapped and s.ledger.is_swapped("b")  # type: ignore[union-attr]
    while s.get("a") is not None:
        step(s, 100.0, lengths)
    plan, _ = step(s, 101.0, lengths)
    assert plan.resumed == ("b",) and plan.admitted == ()


def test_backlog_estimate_grows_with_the_queue() -> None:
    s = _goodput(dataclasses.replace(CFG, max_batch=1, admission_control=False))
    assert s.backlog_s(0.0) == 0.0
    s.add(make_request("a", predicted=10))
    s.schedule(0.0)
    one = s.backlog_s(0.0)
    s.add(make_request("b", predicted=10))
    assert one > 0 and s.backlog_s(0.0) > one


@pytest.mark.parametrize("name", ["fcfs_static", "fcfs_continuous", "slo_goodput"])
def test_a_request_that_could_never_fit_the_kv_budget_is_rejected_not_queued_forever(name: str) -> None:
    cfg = dataclasses.replace(CFG, kv=KvBudget(block_tokens=4, total_blocks=2), admission_control=False)
    s = make_scheduler(name, cfg, COST)
    s.add(make_request("big", prompt=4, predicted=2, max_tokens=20))
    s.add(make_request("small", prompt=2, predicted=2, max_tokens=4))
    plan = s.schedule(0.0)
    assert [(v.request_id, v.action) for v in plan.verdicts] == [("big", "reject")]
    assert "exceed the worker's KV budget of 8 tokens" in plan.verdicts[0].reason
    assert plan.batch == ("small",)


def test_a_running_request_outgrowing_the_whole_budget_fails_loudly() -> None:
    cfg = dataclasses.replace(CFG, kv=KvBudget(block_tokens=4, total_blocks=2))
    s = make_scheduler("fcfs_continuous", cfg, COST)
    s.add(make_request("big", prompt=4, predicted=2, max_tokens=4))
    step(s, 0.0, {"big": 20})
    s.get("big").max_tokens = 20  # type: ignore[union-attr]  # a cap raised after the fit check
    with pytest.raises(RuntimeError, match="KV budget too small"):
        for i in range(1, 20):
            step(s, float(i), {"big": 20})
