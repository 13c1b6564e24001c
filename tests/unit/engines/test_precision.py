"""Lower-precision weights stay within a stated tolerance of fp32 (``bench/engine.py`` holds every
variant to the same bound on SmolLM2 and reports it): teacher-forced on fp32's own greedy tokens,
the top token agrees at >= 95 % of positions and the mean KL(fp32 || variant) is <= 0.01 nats.
Dynamic int8 (activations quantised too) does not meet it on SmolLM2 and is not a serving option."""

from __future__ import annotations

import copy

import pytest
import torch

from bench.engine import KL_TOLERANCE, TOP1_TOLERANCE, _quality
from tests.unit.engines.conftest import tiny_llama
from workers.engines.base import EngineRequest, SamplingParams
from workers.engines.precision import Int8WeightLinear, apply_precision, weight_bytes
from workers.engines.torch_engine import TorchEngine


def _greedy_sequences(model, prompts: list[list[int]], n: int) -> list[tuple[list[int], int]]:
    with torch.no_grad():
        return [(model.generate(torch.tensor([p]), max_new_tokens=n, do_sample=False, pad_token_id=0)[0].tolist(),
                 len(p)) for p in prompts]


@pytest.mark.parametrize("precision", ["bfloat16", "int8-weight"])
def test_serving_precisions_stay_within_tolerance_of_fp32_on_a_small_llama(precision: str) -> None:
    ref = tiny_llama(seed=3)
    variant = apply_precision(copy.deepcopy(ref), precision, keep_float_layers=0)
    seqs = _greedy_sequences(ref, [[5 + i, 40, 77, 90 + i, 12] for i in range(6)], 24)
    q = _quality(ref, variant, seqs, "cpu")
    assert q["top1_agreement"] >= TOP1_TOLERANCE and q["mean_kl"] <= KL_TOLERANCE, q


def test_int8_weights_quarter_the_bytes_read_and_keep_the_last_layers_float() -> None:
    model = tiny_llama()
    fp32 = weight_bytes(model)
    quant = apply_precision(copy.deepcopy(model), "int8-weight", keep_float_layers=1)
    assert isinstance(quant.model.layers[0].self_attn.q_proj, Int8WeightLinear)
    assert isinstance(quant.model.layers[1].self_attn.q_proj, torch.nn.Linear)  # adapters and checkpoints go here
    assert isinstance(quant.lm_head, Int8WeightLinear)
    assert weight_bytes(quant) < 0.6 * fp32
    with pytest.raises(ValueError, match="precision='fp8'"):
        apply_precision(model, "fp8")


def test_the_engine_serves_in_bf16_with_a_bf16_kv_cache(tokenizer) -> None:
    engine = TorchEngine(tiny_llama(), tokenizer, "tiny", device="cpu", dtype="bfloat16")
    assert engine.kv_bytes_per_token == 2 * 2 * 2 * 16 * 2  # k and v, 2 layers, 2 heads, head_dim 16, 2 bytes
    engine.submit(EngineRequest("a", (5, 6, 7), SamplingParams(max_tokens=5, ignore_eos=True)))
    tokens: list[int] = []
    for _ in range(5):
        tokens += engine.execute(["a"])["a"].token_ids
    assert len(tokens) == 5


@pytest.mark.model
@pytest.mark.parametrize("precision", ["bfloat16"])
def test_smollm2_in_lower_precision_stays_within_tolerance(precision: str) -> None:
    from bench.engine import QUALITY_PROMPTS
    from models.loader import load_model
    from workers.engines.torch_engine import encode_chat

    loaded = load_model("smollm2-135m")
    variant = apply_precision(copy.deepcopy(loaded.model), precision)
    seqs = _greedy_sequences(loaded.model, [encode_chat(loaded.tokenizer, p) for p in QUALITY_PROMPTS[:4]], 32)
    q = _quality(loaded.model, variant, seqs, "cpu")
    assert q["within_tolerance"], q
