"""Each policy on hand-built queues: who joins, who waits, who leaves, and when."""

import pytest

from core.scheduling.cost import StepCostModel
from core.scheduling.policies import POLICIES, SchedulerConfig, StepResult, make_scheduler
from core.scheduling.state import RequestStatus
from tests.unit.scheduling.factories import COST, make_request, step


def test_factory_knows_the_four_policies() -> None:
    assert set(POLICIES) == {"slo_odbs", "fcfs_static", "fcfs_continuous", "sjf", "slo_goodput"}
    with pytest.raises(ValueError, match="unknown policy 'edf'"):
        make_scheduler("edf")


def test_fcfs_continuous_fills_free_rows_in_arrival_order_between_steps() -> None:
    s = make_scheduler("fcfs_continuous", SchedulerConfig(max_batch=2), COST)
    for i, rid in enumerate(["a", "b", "c", "d"]):
        s.add(make_request(rid, arrival=i))
    lengths = {"a": 1, "b": 3, "c": 2, "d": 1}
    plan, done = step(s, 0.0, lengths)
    assert plan.batch == ("a", "b") and plan.admitted == ("a", "b") and done == ["a"]
    plan, done = step(s, 1.0, lengths)  # a left; c joins while b keeps decoding
    assert plan.batch == ("b", "c") and plan.admitted == ("c",) and done == []
    plan, done = step(s, 2.0, lengths)
    assert plan.batch == ("b", "c") and plan.admitted == () and sorted(done) == ["b", "c"]
    plan, done = step(s, 3.0, lengths)
    assert plan.batch == ("d",) and done == ["d"]
    assert not s.has_work()


def test_fcfs_static_keeps_finished_rows_as_padding_until_the_batch_completes() -> None:
    s = make_scheduler("fcfs_static", SchedulerConfig(max_batch=2), COST)
    for i, rid in enumerate(["a", "b", "c"]):
        s.add(make_request(rid, arrival=i))
    lengths = {"a": 1, "b": 3, "c": 1}
    plan, done = step(s, 0.0, lengths)
    assert plan.batch == ("a", "b") and done == []
    assert s.get("a").status is RequestStatus.HELD  # type: ignore[union-attr]
    plan, done = step(s, 1.0, lengths)
    assert plan.batch == ("a", "b") and plan.admitted == () and done == []  # c may not join
    plan, done = step(s, 2.0, lengths)
    assert sorted(done) == ["a", "b"]  # the whole batch completes at once
    plan, done = step(s, 3.0, lengths)
    assert plan.batch == ("c",) and done == ["c"]


def test_sjf_admits_shortest_prediction_first() -> None:
    s = make_scheduler("sjf", SchedulerConfig(max_batch=2), COST)
    for rid, pred in [("long", 300), ("mid", 50), ("short", 5)]:
        s.add(make_request(rid, predicted=pred))
    plan = s.schedule(0.0)
    assert plan.batch == ("short", "mid")


def test_prefill_budget_limits_how_many_prompts_join_in_one_iteration() -> None:
    s = make_scheduler("fcfs_continuous", SchedulerConfig(max_batch=8, max_prefill_tokens=250), COST)
    for rid in "abcd":
        s.add(make_request(rid, prompt=100))
    assert s.schedule(0.0).admitted == ("a", "b")  # 3 x 100 padded tokens would exceed 250


def test_slo_odbs_orders_by_deadline_plus_weighted_length_and_puts_hopeless_last() -> None:
    s = make_scheduler("slo_odbs", SchedulerConfig(max_batch=3, protect_slo=False), COST)
    # t1 ~ 11 ms/token: "late" cannot finish 100 tokens by t=0.5 even alone -> hopeless.
    s.add(make_request("late", predicted=100, deadline=0.5))
    s.add(make_request("loose", predicted=10, deadline=60.0))
    s.add(make_request("tight", predicted=10, deadline=2.0))
    s.add(make_request("tight_long", predicted=150, deadline=2.0))
    assert s.schedule(0.0).batch == ("tight", "tight_long", "loose")
    assert "late" in s.waiting


def test_slo_odbs_refuses_a_join_that_would_make_an_on_track_request_late() -> None:
    # Decode step = 10 ms + 10 ms per row: alone "urgent" needs 100 x 20 ms = 2.0 s; with a
    # second row 100 x 30 ms = 3.0 s. Its deadline of 2.5 s allows no company.
    cost = StepCostModel(0.010, 0.010, 0.0, 0.0, 0.0)
    s = make_scheduler("slo_odbs", SchedulerConfig(max_batch=8), cost)
    s.add(make_request("urgent", predicted=100, deadline=2.5))
    assert s.schedule(0.0).admitted == ("urgent",)
    s.update(s.schedule(0.0), {"urgent": StepResult(1)}, 0.02)
    s.add(make_request("other", predicted=10, deadline=100.0))
    assert s.schedule(0.02).admitted == ()
    # Near its end "urgent" has slack again, and the other request may join.
    s.get("urgent").generated = 90  # type: ignore[union-attr]
    assert s.schedule(1.8).admitted == ("other",)
    # Without the guard the same state admits at once (fcfs_continuous behaviour).
    relaxed = make_scheduler("slo_odbs", SchedulerConfig(max_batch=8, protect_slo=False), cost)
    relaxed.add(make_request("urgent", predicted=100, deadline=2.5))
    relaxed.add(make_request("other", predicted=10, deadline=100.0))
    assert relaxed.schedule(0.0).admitted == ("urgent", "other")


def test_slo_odbs_padding_bound_holds_back_a_much_longer_request() -> None:
    s = make_scheduler(
        "slo_odbs", SchedulerConfig(max_batch=8, max_padding_tokens=500, protect_slo=False), COST
    )
    for rid in ("s1", "s2", "s3"):
        s.add(make_request(rid, predicted=20, deadline=1.0))
    s.add(make_request("huge", predicted=400, deadline=1.5))
    plan = s.schedule(0.0)
    # (408 - 28) extra context x 4 rows = 1520 padded slots > 500: "huge" waits for an emptier batch.
    assert plan.admitted == ("s1", "s2", "s3")


def test_abort_removes_waiting_and_running_requests() -> None:
    s = make_scheduler("fcfs_continuous", SchedulerConfig(max_batch=1), COST)
    s.add(make_request("a"))
    s.add(make_request("b"))
    s.schedule(0.0)
    assert s.abort("a").status is RequestStatus.ABORTED  # type: ignore[union-attr]
    assert s.abort("missing") is None
    assert s.schedule(0.1).admitted == ("b",)
    with pytest.raises(ValueError, match="already scheduled"):
        s.add(make_request("b"))
