"""ServingLoop over the real torch engine (tiny random Llama): events, dedupe, abort, policies."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from core.scheduling.policies import SchedulerConfig
from tests.unit.engines.conftest import make_adapter
from workers.engines.base import SamplingParams
from workers.engines.torch_engine import TorchEngine
from workers.serving import ChunkEvent, FinalEvent, ServeEvent, ServeRequest, ServingConfig, ServingLoop


def _drain(loop: ServingLoop, limit: int = 1000) -> list[list[ServeEvent]]:
    steps = []
    while loop.has_work() and limit:
        steps.append(loop.step())
        limit -= 1
    return steps


def _finals(steps: list[list[ServeEvent]]) -> dict[str, FinalEvent]:
    return {e.request_id: e for s in steps for e in s if isinstance(e, FinalEvent)}


def test_requests_stream_ordered_chunks_and_one_final_each(engine: TorchEngine) -> None:
    loop = ServingLoop(engine, config=ServingConfig(policy="fcfs_continuous"))
    for i, n in enumerate([3, 9, 5]):
        loop.admit(ServeRequest(f"r{i}", f"prompt number {i}", SamplingParams(max_tokens=n, ignore_eos=True)))
    loop.admit(ServeRequest("r1", "a re-delivered duplicate", SamplingParams(max_tokens=2)))
    steps = _drain(loop)
    finals = _finals(steps)
    assert sorted(finals) == ["r0", "r1", "r2"]
    for rid, n in (("r0", 3), ("r1", 9), ("r2", 5)):
        chunks = [e for s in steps for e in s if isinstance(e, ChunkEvent) and e.request_id == rid]
        assert [c.index for c in chunks] == list(range(len(chunks)))
        f = finals[rid]
        assert f.text == "".join(c.text for c in chunks)
        assert f.output_tokens == n and f.finish_reason == "length"
        assert 0 <= f.queue_s <= f.first_token_s <= f.total_s
        assert f.prompt_tokens == len(f"prompt number {rid[1]}".encode())
        assert f.model_version == "base" and f.adapter_version == "" and f.slo_met is None
    assert engine.active == ()
    assert loop.predictor.observed == 3
    stats = loop.stats()
    assert stats["queue_length"] == 0 and stats["running"] == 0 and stats["tokens_per_s"] > 0
    assert stats["memory_rss_bytes"] > 0 and stats["loaded_adapters"] == []


def test_static_batches_complete_together_and_continuous_ones_do_not(engine: TorchEngine) -> None:
    for policy, together in (("fcfs_static", True), ("fcfs_continuous", False)):
        loop = ServingLoop(engine, config=ServingConfig(policy=policy, scheduler=SchedulerConfig(max_batch=4)))
        for i, n in enumerate([2, 6, 4]):
            loop.admit(ServeRequest(f"{policy}{i}", "same prompt", SamplingParams(max_tokens=n, ignore_eos=True)))
        steps = _drain(loop)
        final_steps = {i for i, s in enumerate(steps) for e in s if isinstance(e, FinalEvent)}
        assert (len(final_steps) == 1) is together


def test_abort_drops_a_request_without_a_final(engine: TorchEngine) -> None:
    loop = ServingLoop(engine, config=ServingConfig(policy="sjf"))
    loop.admit(ServeRequest("keep", "x", SamplingParams(max_tokens=4, ignore_eos=True)))
    loop.admit(ServeRequest("drop", "y", SamplingParams(max_tokens=50, ignore_eos=True)))
    loop.step()
    assert loop.running == 2
    loop.abort("drop")
    finals = _finals(_drain(loop))
    assert list(finals) == ["keep"]
    assert engine.active == ()


def test_slo_deadline_is_reported_and_admission_is_thread_safe(engine: TorchEngine) -> None:
    loop = ServingLoop(engine, config=ServingConfig(policy="slo_odbs"))

    def producer() -> None:
        for i in range(5):
            loop.admit(ServeRequest(f"t{i}", "hello", SamplingParams(max_tokens=3, ignore_eos=True), slo_s=1e6))

    t = threading.Thread(target=producer)
    t.start()
    t.join()
    finals = _finals(_drain(loop))
    assert sorted(finals) == [f"t{i}" for i in range(5)]
    assert all(f.slo_met for f in finals.values())


def test_checkpoint_loaded_between_steps_versions_later_requests(engine: TorchEngine, tmp_path: Path) -> None:
    loop = ServingLoop(engine, config=ServingConfig(policy="fcfs_continuous"))
    loop.admit(ServeRequest("before", "a", SamplingParams(max_tokens=2, ignore_eos=True)))
    first = _finals(_drain(loop))
    weight = dict(engine.model.named_parameters())["model.layers.0.mlp.up_proj.weight"]
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    save_file({"model.layers.0.mlp.up_proj.weight": torch.zeros_like(weight)}, str(ckpt / "model.safetensors"))
    (ckpt / "checkpoint.json").write_text(json.dumps({"base_model": "tiny-llama", "version": "v2", "step": 2}))
    loop.load_checkpoint("v2", str(ckpt))
    loop.admit(ServeRequest("after", "a", SamplingParams(max_tokens=2, ignore_eos=True)))
    second = _finals(_drain(loop))
    assert first["before"].model_version == "base" and second["after"].model_version == "v2"
    assert loop.stats()["model_version"] == "v2"
    assert torch.count_nonzero(weight) == 0


def test_adapters_are_reported_and_unknown_ones_fall_back_to_base(engine: TorchEngine, tmp_path: Path) -> None:
    loop = ServingLoop(engine, config=ServingConfig(policy="fcfs_continuous"))
    loop.load_adapter("hash-a", str(make_adapter(tmp_path, "a", 1)))
    sp = SamplingParams(max_tokens=6, ignore_eos=True)
    loop.admit(ServeRequest("with", "hi there", sp, adapter="hash-a"))
    loop.admit(ServeRequest("unknown", "hi there", sp, adapter="hash-missing"))
    loop.admit(ServeRequest("base", "hi there", sp))
    finals = _finals(_drain(loop))
    assert finals["with"].adapter_version == "hash-a"
    assert finals["unknown"].adapter_version == ""
    assert finals["unknown"].text == finals["base"].text != finals["with"].text
    assert loop.stats()["loaded_adapters"] == ["hash-a"]


def test_admission_control_rejects_reroutes_or_shortens_hopeless_requests_with_the_reason(
        engine: TorchEngine) -> None:
    cfg = SchedulerConfig(max_batch=4, shorten_min_tokens=4)
    loop = ServingLoop(engine, config=ServingConfig(policy="slo_goodput", scheduler=cfg, online_cost=None))
    long = SamplingParams(max_tokens=200, ignore_eos=True)
    # The prior cost model takes ~40 ms a step: 200 tokens cannot fit 0.03 s, nor a useful part of them.
    loop.admit(ServeRequest("reject", "a", long, slo_s=0.03))
    loop.admit(ServeRequest("reroute", "b", long, slo_s=0.03, reroutable=True))
    loop.admit(ServeRequest("shorten", "c", long, slo_s=0.5))
    loop.admit(ServeRequest("fine", "d", SamplingParams(max_tokens=3, ignore_eos=True), slo_s=60.0))
    finals = _finals(_drain(loop))
    assert finals["reject"].finish_reason == "rejected" and finals["reject"].output_tokens == 0
    assert "cannot meet its deadline" in finals["reject"].note and finals["reject"].slo_met is False
    assert finals["reroute"].finish_reason == "rerouted" and "cheaper model" in finals["reroute"].note
    short = finals["shorten"]
    assert short.finish_reason == "length" and 4 <= short.output_tokens < 200 and short.note.startswith("shortened")
    assert finals["fine"].note == "" and finals["fine"].output_tokens == 3
    assert loop.verdicts == {"reject": 1, "reroute": 1, "shorten": 1}
    assert loop.predictor.observed == 1  # a shortened answer does not teach the length predictor
    assert engine.active == ()


def test_the_cost_model_is_calibrated_online_from_the_loops_own_steps(engine: TorchEngine) -> None:
    from core.scheduling.calibration import OnlineCostConfig

    loop = ServingLoop(engine, config=ServingConfig(policy="fcfs_continuous",
                                                    online_cost=OnlineCostConfig(min_samples=8, refit_every=8)))
    prior = loop.scheduler.cost
    for i in range(6):
        loop.admit(ServeRequest(f"c{i}", f"calibrate {i}", SamplingParams(max_tokens=6 + i, ignore_eos=True)))
    _drain(loop)
    assert loop.calibration is not None and loop.calibration.fits >= 1
    assert loop.scheduler.cost is loop.calibration.model and loop.scheduler.cost != prior
    stats = loop.stats()
    assert stats["step_cost"] is loop.scheduler.cost and stats["cost_samples"] == loop.calibration.samples
    assert stats["mean_output_tokens"] == pytest.approx(sum(6 + i for i in range(6)) / 6)
    assert stats["device"] == "cpu" and stats["kv_blocks_total"] == 0
