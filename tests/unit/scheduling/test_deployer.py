"""HELR: the bitmask DPs against brute force on small random instances."""

import itertools
import math
import random

import pytest

from core.scheduling.deployer import (
    DeployConfig,
    Device,
    ModelProfile,
    expected_latency_ms,
    place_model,
    plan_deployment,
)


def _instance(rng: random.Random, n: int) -> tuple[list[Device], list[list[float]]]:
    devices = [
        Device(f"d{i}", memory_gib=rng.choice([1.0, 2.0, 3.0, 4.0]), speed=rng.choice([0.5, 1.0, 1.5, 2.0]))
        for i in range(n)
    ]
    links = [[0.0 if i == j else rng.uniform(0.1, 3.0) for j in range(n)] for i in range(n)]
    return devices, links


def _brute_place(
    model: ModelProfile, devices: list[Device], links: list[list[float]], cfg: DeployConfig
) -> float:
    caps = [math.floor((d.memory_gib - cfg.reserve_gib) / model.layer_gib + 1e-9) for d in devices]
    best = math.inf
    for k in range(1, len(devices) + 1):
        for order in itertools.permutations(range(len(devices)), k):
            for split in itertools.product(*[range(1, caps[i] + 1) for i in order]):
                if sum(split) != model.layers:
                    continue
                cost = sum(n * model.layer_ms / devices[i].speed for n, i in zip(split, order, strict=True))
                cost += sum(links[a][b] for a, b in itertools.pairwise(order)) + cfg.device_penalty_ms * k
                best = min(best, cost)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_place_model_equals_brute_force(seed: int) -> None:
    rng = random.Random(seed)
    devices, links = _instance(rng, 4)
    model = ModelProfile("m", layers=6, memory_gib=6.0, per_token_ms=12.0)
    cfg = DeployConfig(reserve_gib=rng.choice([0.0, 0.5]), device_penalty_ms=rng.choice([0.0, 1.0, 5.0]))
    want = _brute_place(model, devices, links, cfg)
    if math.isinf(want):
        with pytest.raises(ValueError, match="fits on no subset"):
            place_model(model, devices, links, cfg)
        return
    got = place_model(model, devices, links, cfg)
    assert got.cost_ms == pytest.approx(want)
    assert sum(got.layers) == model.layers and len(set(got.devices)) == len(got.devices)


def test_heavy_device_penalty_prefers_fewest_devices_and_zero_prefers_speed() -> None:
    devices = [Device("big_slow", 8.0, 0.5), Device("fast1", 4.0, 2.0), Device("fast2", 4.0, 2.0)]
    links = [[0.0, 1.0, 1.0], [1.0, 0.0, 0.2], [1.0, 0.2, 0.0]]
    model = ModelProfile("m", layers=8, memory_gib=8.0, per_token_ms=16.0)
    lr = place_model(model, devices, links, DeployConfig(device_penalty_ms=0.0))
    he = place_model(model, devices, links, DeployConfig(device_penalty_ms=100.0))
    assert set(lr.devices) == {1, 2} and lr.latency_ms == pytest.approx(8 * 2 / 2.0 + 0.2)
    assert he.devices == (0,)


def _brute_deploy(models: list[ModelProfile], devices: list[Device], links: list[list[float]]) -> float:
    n = len(devices)
    labels = [None] + [(m, g) for m in range(len(models)) for g in range(n)]
    total = sum(m.demand_tokens_per_s for m in models)
    best = math.inf
    for assign in itertools.product(labels, repeat=n):
        groups: dict[tuple[int, int], list[int]] = {}
        for dev, lab in enumerate(assign):
            if lab is not None:
                groups.setdefault(lab, []).append(dev)
        obj = 0.0
        for mi, model in enumerate(models):
            lats = []
            for (m, _), devs in groups.items():
                if m != mi:
                    continue
                sub = [devices[d] for d in devs]
                sub_links = [[links[a][b] for b in devs] for a in devs]
                lats.append(_brute_place(model, sub, sub_links, DeployConfig()))
            lat = (
                expected_latency_ms(lats, model.demand_tokens_per_s)
                if all(map(math.isfinite, lats))
                else math.inf
            )
            obj += model.demand_tokens_per_s / total * lat
        best = min(best, obj)
    return best


@pytest.mark.parametrize("seed", range(3))
def test_plan_deployment_equals_brute_force(seed: int) -> None:
    rng = random.Random(100 + seed)
    devices, links = _instance(rng, 4)
    models = [
        ModelProfile("small", 2, 1.0, 4.0, demand_tokens_per_s=rng.uniform(50, 400)),
        ModelProfile("large", 4, 3.0, 10.0, demand_tokens_per_s=rng.uniform(20, 150)),
    ]
    want = _brute_deploy(models, devices, links)
    if math.isinf(want):
        with pytest.raises(ValueError, match="no deployment"):
            plan_deployment(models, devices, links)
        return
    got = plan_deployment(models, devices, links)
    assert got.expected_latency_ms == pytest.approx(want)
    used = [d for r in got.replicas for d in r.placement.devices]
    assert len(used) == len(set(used))
    assert {r.model for r in got.replicas} == {"small", "large"}


def test_replica_count_follows_demand_under_a_device_penalty() -> None:
    devices = [Device(f"d{i}", 2.0, 1.0) for i in range(4)]
    cfg = DeployConfig(device_penalty_ms=1.0)
    # One replica serves 100 tokens/s at 10 ms/token. At 10 tokens/s a second replica saves
    # 1000/90 - 2000/190 = 0.6 ms but costs 1 ms; at 350 tokens/s only all four keep up.
    low = plan_deployment([ModelProfile("m", 2, 1.0, 10.0, demand_tokens_per_s=10.0)], devices, config=cfg)
    high = plan_deployment([ModelProfile("m", 2, 1.0, 10.0, demand_tokens_per_s=350.0)], devices, config=cfg)
    assert len(low.replicas) == 1
    assert len(high.replicas) == 4
    assert high.expected_latency_ms == pytest.approx(4000 / (400 - 350) + 4.0)


@pytest.mark.parametrize("seed", range(8))
def test_helr_never_loses_to_round_robin_on_heterogeneous_devices(seed: int) -> None:
    from core.scheduling.deployer import round_robin_deployment

    rng = random.Random(100 + seed)
    devices = [Device(f"d{i}", memory_gib=4.0, speed=rng.choice([0.25, 0.5, 1.0, 2.0])) for i in range(4)]
    models = [ModelProfile("a", layers=6, memory_gib=1.0, per_token_ms=20.0, demand_tokens_per_s=rng.uniform(5, 60)),
              ModelProfile("b", layers=6, memory_gib=2.0, per_token_ms=40.0, demand_tokens_per_s=rng.uniform(5, 30))]
    try:
        rr = round_robin_deployment(models, devices)
    except ValueError:
        return
    helr = plan_deployment(models, devices)
    assert helr.expected_latency_ms <= rr.expected_latency_ms + 1e-9
    if any(d.speed != devices[0].speed for d in devices):
        assert {r.model for r in helr.replicas} == {"a", "b"}


def test_worker_plans_enforce_their_placement_through_the_environment() -> None:
    from flywheel.deployment import WorkerPlan

    assert WorkerPlan("m", ("cpu0", "cpu1"), (0, 1), (15, 15)).env() == {"FLYWHEEL_WORKER_CPUS": "0,1"}
    one_gpu = WorkerPlan("m", ("cuda:1",), (), (30,)).env()
    assert one_gpu == {"CUDA_VISIBLE_DEVICES": "1"}
    pipeline = WorkerPlan("m", ("cuda:2", "cuda:0"), (), (20, 10)).env()
    assert pipeline == {"CUDA_VISIBLE_DEVICES": "2,0", "FLYWHEEL_WORKER_PIPELINE_PARALLEL": "2",
                        "FLYWHEEL_WORKER_PIPELINE_LAYERS": "20,10"}


def test_measured_speeds_and_latencies_drive_the_plan() -> None:
    from flywheel.deployment import measured_per_token_ms, plan_workers

    beats = [{"model": "smollm2-135m", "event_time": 1, "step_cost": {
                "decode_base_s": 0.1, "decode_per_row_s": 0.0, "decode_per_cell_s": 0.0, "overhead_s": 0.0,
                "samples": 50}},
             {"model": "smollm2-135m", "event_time": 2, "step_cost": {
                "decode_base_s": 0.2, "decode_per_row_s": 0.0, "decode_per_cell_s": 0.0, "overhead_s": 0.0,
                "samples": 50}},
             {"model": "gemma3-270m", "event_time": 3, "step_cost": None}]
    assert measured_per_token_ms(beats) == {"smollm2-135m": pytest.approx(200.0)}
    # A fast and a slow device, and the heavier model (by measured latency) gets the fast one.
    devices = [Device("cpu0", 8.0, 1.0), Device("cpu1", 8.0, 0.2)]
    plans = plan_workers(["smollm2-135m", "gemma3-270m"], devices, demand_tokens_per_s=2.0,
                         per_token_ms={"smollm2-135m": 200.0, "gemma3-270m": 20.0})
    by_model = {p.model: p.devices for p in plans}
    assert by_model["smollm2-135m"] == ("cpu0",) and by_model["gemma3-270m"] == ("cpu1",)
