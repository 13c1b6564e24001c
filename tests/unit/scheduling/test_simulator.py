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
