import pytest

from core.scheduling.policies import SchedulerConfig, make_scheduler
from core.scheduling.simulator import SimRequest, simulate, summarize
from tests.unit.scheduling.factories import COST


def _burst(n: int) -> list[SimRequest]:
    lengths = [5 + (37 * i) % 60 for i in range(n)]
    return [SimRequest(f"r{i}", 0.0, 16, lengths[i], deadline_s=3.0) for i in range(n)]


def test_single_request_takes_one_prefill_and_n_minus_one_decode_steps() -> None:
    req = SimRequest("a", 1.0, prompt_tokens=10, output_tokens=5)
    [out] = simulate([req], make_scheduler("fcfs_continuous"), COST, predict=lambda r: 5)
    expected = COST.prefill_s(1, 10) + 4 * COST.decode_s(1, 12)
    assert out.first_token_s == pytest.approx(1.0 + COST.prefill_s(1, 10))
    assert out.latency_s == pytest.approx(expected, rel=0.05)
    assert out.output_tokens == 5


def test_every_request_completes_with_its_own_length_under_every_policy() -> None:
    reqs = _burst(40)
    for name in ("fcfs_static", "fcfs_continuous", "sjf", "slo_odbs"):
        outs = simulate(
            reqs,
            make_scheduler(name, SchedulerConfig(max_batch=8), COST),
            COST,
            predict=lambda r: r.output_tokens,
        )
        assert sorted(o.request_id for o in outs) == sorted(r.request_id for r in reqs)
        assert {o.request_id: o.output_tokens for o in outs} == {r.request_id: r.output_tokens for r in reqs}


def test_continuous_batching_beats_static_and_sjf_beats_fcfs_on_mean_latency() -> None:
    reqs = _burst(40)
    cfg = SchedulerConfig(max_batch=8)
    mean = {
        name: summarize(
            simulate(reqs, make_scheduler(name, cfg, COST), COST, predict=lambda r: r.output_tokens)
        ).mean_latency_s
        for name in ("fcfs_static", "fcfs_continuous", "sjf")
    }
    assert mean["fcfs_continuous"] < mean["fcfs_static"]
    assert mean["sjf"] < mean["fcfs_continuous"]


def test_idle_gaps_jump_to_the_next_arrival_and_online_learning_sees_every_request() -> None:
    reqs = [SimRequest("a", 0.0, 8, 3), SimRequest("b", 100.0, 8, 3)]
    seen: list[str] = []
    outs = simulate(
        reqs, make_scheduler("sjf"), COST, predict=lambda r: 3, observe=lambda r: seen.append(r.request_id)
    )
    assert outs[1].first_token_s >= 100.0
    assert seen == ["a", "b"]
    m = summarize(outs)
    assert m.slo_attainment == 1.0 and m.n == 2


def test_rejections_are_outcomes_and_goodput_counts_only_full_answers_on_time() -> None:
    from core.scheduling.policies import SchedulerConfig as Cfg

    reqs = [SimRequest("hopeless", 0.0, 8, 100, deadline_s=0.1), SimRequest("ok", 0.0, 8, 5, deadline_s=10.0),
            SimRequest("late", 10.0, 8, 50, deadline_s=10.1)]
    outs = {o.request_id: o for o in simulate(reqs, make_scheduler("slo_goodput", Cfg(max_batch=4), COST), COST,
                                                  predict=lambda r: r.output_tokens)}
    assert outs["hopeless"].verdict == "reject" and not outs["hopeless"].served and outs["hopeless"].output_tokens == 0
    assert outs["ok"].good and outs["late"].verdict == "reject"
    m = summarize(list(outs.values()))
    assert m.rejected == pytest.approx(2 / 3)
    assert m.goodput_rps == pytest.approx(1 / 10.0)  # one good answer over 10 s of arrivals
    assert m.mean_latency_s == pytest.approx(outs["ok"].latency_s)  # rejections are not latencies


def test_recomputed_preemptions_cost_a_prefill_of_prompt_and_generated_tokens() -> None:
    from core.scheduling.kv import KvBudget
    from core.scheduling.policies import SchedulerConfig as Cfg

    reqs = [SimRequest("a", 0.0, 8, 40), SimRequest("b", 0.0, 8, 40)]
    free = simulate(reqs, make_scheduler("fcfs_continuous", Cfg(max_batch=2), COST), COST, predict=lambda r: 4)
    tight_cfg = Cfg(max_batch=2, kv=KvBudget(block_tokens=8, total_blocks=8))
    tight = simulate(reqs, make_scheduler("fcfs_continuous", tight_cfg, COST), COST, predict=lambda r: 4)
    assert sum(o.preemptions for o in tight) > 0 and sum(o.preemptions for o in free) == 0
    assert max(o.finish_s for o in tight) > max(o.finish_s for o in free)
    assert {o.request_id: o.output_tokens for o in tight} == {"a": 40, "b": 40}
