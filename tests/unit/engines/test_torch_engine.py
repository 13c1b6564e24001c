"""The torch engine on a tiny random Llama: batch invariance, stopping, adapters, checkpoints."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from safetensors.torch import save_file

from core.errors import ValidationError
from tests.unit.engines.conftest import EOS, ByteTokenizer, make_adapter, tiny_llama
from workers.engines.base import EngineRequest, SamplingParams, TokenOutput
from workers.engines.torch_engine import TorchEngine

PROMPTS = ["hello world", "a", "the quick brown fox jumps over", "xyz 123", "zz top", "0123456789abcdef"]


def _reference(model: Any, tok: ByteTokenizer, prompt: str, n: int) -> list[int]:
    ids = torch.tensor([tok.encode(prompt)])
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=n,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    return out[0, ids.shape[1] :].tolist()


def _run(
    engine: TorchEngine, jobs: Mapping[str, tuple[str, SamplingParams, str | None]], join_at: dict[str, int]
) -> dict[str, list[TokenOutput]]:
    """Drive the engine: job ``rid`` joins at iteration ``join_at[rid]`` and leaves when finished."""
    outs: dict[str, list[TokenOutput]] = {rid: [] for rid in jobs}
    active: list[str] = []
    for it in range(10_000):
        for rid, at in join_at.items():
            if at == it:
                prompt, sp, adapter = jobs[rid]
                engine.submit(EngineRequest(rid, tuple(engine.encode_prompt(prompt)), sp, adapter))
                active.append(rid)
        if not active and it > max(join_at.values()):
            return outs
        if not active:
            continue
        for rid, out in engine.execute(active).items():
            outs[rid].append(out)
            if out.finished:
                engine.release(rid)
                active.remove(rid)
    raise AssertionError("did not finish")


def _tokens(outs: list[TokenOutput]) -> list[int]:
    return [t for o in outs for t in o.token_ids]


def test_greedy_output_does_not_depend_on_the_batch(tokenizer: ByteTokenizer) -> None:
    model = tiny_llama()
    # Small cache margins force every relayout path (left margin, right edge, row growth).
    engine = TorchEngine(model, tokenizer, "tiny", device="cpu", eos_token_ids=[EOS], cache_margin=4, cache_headroom=3)
    lengths = [7, 30, 12, 25, 3, 18]
    jobs = {p: (p, SamplingParams(max_tokens=n, ignore_eos=True), None) for p, n in zip(PROMPTS, lengths, strict=True)}
    staggered = _run(engine, jobs, {p: 2 * i for i, p in enumerate(PROMPTS)})
    for prompt, n in zip(PROMPTS, lengths, strict=True):
        alone = _run(engine, {prompt: jobs[prompt]}, {prompt: 0})
        want = _reference(tiny_llama(), tokenizer, prompt, n)  # untouched stock-attention model
        assert _tokens(staggered[prompt]) == want == _tokens(alone[prompt])
        assert staggered[prompt][-1].finish_reason == "length"
    assert engine.active == ()


def test_static_padding_rows_compute_but_emit_nothing(engine: TorchEngine) -> None:
    engine.submit(EngineRequest("short", tuple(engine.encode_prompt("ab")), SamplingParams(max_tokens=2)))
    engine.submit(EngineRequest("long", tuple(engine.encode_prompt("cd")), SamplingParams(max_tokens=5)))
    seen = [engine.execute(["short", "long"]) for _ in range(5)]
    assert [len(s["short"].token_ids) for s in seen] == [1, 1, 0, 0, 0]
    assert all(s["short"].finished for s in seen[1:])
    assert [s["long"].finished for s in seen] == [False] * 4 + [True]
    with pytest.raises(ValueError, match="must be in every batch"):
        engine.execute(["long"])


def test_eos_and_stop_strings_end_a_sequence(tokenizer: ByteTokenizer) -> None:
    model = tiny_llama()
    free = _reference(tiny_llama(), tokenizer, "hello world", 12)
    k = next(i for i in range(1, 12) if free[i] not in free[:i])  # first token not seen before
    engine = TorchEngine(model, tokenizer, "tiny", device="cpu", eos_token_ids=[free[k]])
    outs = _run(engine, {"a": ("hello world", SamplingParams(max_tokens=12), None)}, {"a": 0})["a"]
    assert _tokens(outs) == free[: k + 1] and outs[-1].finish_reason == "stop"
    full_text = tokenizer.decode(free)
    stop = full_text[5:7]
    engine = TorchEngine(model, tokenizer, "tiny", device="cpu", eos_token_ids=[EOS])
    outs = _run(engine, {"b": ("hello world", SamplingParams(max_tokens=12, stop=(stop,)), None)}, {"b": 0})["b"]
    assert "".join(o.text for o in outs) == full_text[: full_text.find(stop)]
    assert outs[-1].finish_reason == "stop"


def test_seeded_sampling_is_reproducible_whatever_the_batch(engine: TorchEngine) -> None:
    sp = SamplingParams(max_tokens=10, temperature=0.8, top_p=0.9, seed=7, ignore_eos=True)
    alone = _run(engine, {"s": ("sample me", sp, None)}, {"s": 0})
    crowd = _run(
        engine,
        {"s": ("sample me", sp, None), "x": ("other", sp, None), "y": ("third one", sp, None)},
        {"x": 0, "s": 1, "y": 2},
    )
    assert _tokens(alone["s"]) == _tokens(crowd["s"])
    greedy = _run(engine, {"g": ("sample me", SamplingParams(max_tokens=10, ignore_eos=True), None)}, {"g": 0})
    assert _tokens(greedy["g"]) != _tokens(alone["s"])


def test_mixed_adapters_in_one_batch_match_each_adapter_alone(tokenizer: ByteTokenizer, tmp_path: Path) -> None:
    a_dir, b_dir = make_adapter(tmp_path, "a", 1), make_adapter(tmp_path, "b", 2)
    engine = TorchEngine(tiny_llama(), tokenizer, "tiny", device="cpu", eos_token_ids=[EOS])
    engine.load_adapter("hash-a", str(a_dir))
    engine.load_adapter("hash-b", str(b_dir))
    engine.load_adapter("hash-a", str(a_dir))  # idempotent
    assert engine.adapters == ("hash-a", "hash-b")
    sp = SamplingParams(max_tokens=12, ignore_eos=True)
    jobs = {
        "base": ("hello world", sp, None),
        "a": ("hello world", sp, "hash-a"),
        "b": ("hello world", sp, "hash-b"),
    }
    mixed = _run(engine, jobs, {"base": 0, "a": 0, "b": 1})
    for rid, adapter_dir in (("a", a_dir), ("b", b_dir)):
        ref = PeftModel.from_pretrained(tiny_llama(), str(adapter_dir)).eval()
        assert _tokens(mixed[rid]) == _reference(ref, tokenizer, "hello world", 12)
    assert _tokens(mixed["base"]) == _reference(tiny_llama(), tokenizer, "hello world", 12)
    assert _tokens(mixed["a"]) != _tokens(mixed["base"])
    with pytest.raises(ValidationError, match="not loaded"):
        engine.submit(EngineRequest("x", (5, 6), sp, "hash-unknown"))
    engine.unload_adapter("hash-b")
    assert engine.adapters == ("hash-a",)


def _checkpoint(tmp_path: Path, base_model: str, tensors: dict[str, torch.Tensor]) -> Path:
    d = tmp_path / "ckpt"
    d.mkdir(exist_ok=True)
    save_file(tensors, str(d / "model.safetensors"))
    (d / "checkpoint.json").write_text(json.dumps({"base_model": base_model, "version": "v7", "step": 7}))
    return d


@pytest.mark.parametrize("wrapped", [False, True])
def test_partial_checkpoint_hot_loads_into_live_weights(
    tokenizer: ByteTokenizer, tmp_path: Path, wrapped: bool
) -> None:
    engine = TorchEngine(tiny_llama(), tokenizer, "tiny", device="cpu", eos_token_ids=[EOS])
    if wrapped:  # peft renames down_proj.weight to down_proj.base_layer.weight
        engine.load_adapter("hash-a", str(make_adapter(tmp_path, "a", 1)))
    target = tiny_llama(seed=5)
    names = [
        "model.layers.1.mlp.down_proj.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "lm_head.weight",
    ]
    state = dict(target.named_parameters())
    reference = tiny_llama()
    with torch.no_grad():
        for n in names:
            dict(reference.named_parameters())[n].copy_(state[n])
    path = _checkpoint(tmp_path, "tiny", {n: state[n].detach().clone() for n in names})
    assert engine.model_version == "base"
    engine.load_checkpoint("v7", str(path))
    assert engine.model_version == "v7"
    sp = SamplingParams(max_tokens=10, ignore_eos=True)
    got = _tokens(_run(engine, {"r": ("hello world", sp, None)}, {"r": 0})["r"])
    assert got == _reference(reference, tokenizer, "hello world", 10)
    assert got != _reference(tiny_llama(), tokenizer, "hello world", 10)


def test_bad_checkpoints_are_rejected_without_touching_weights(engine: TorchEngine, tmp_path: Path) -> None:
    before = {n: p.clone() for n, p in engine.model.named_parameters()}
    good = torch.zeros_like(before["model.layers.1.mlp.down_proj.weight"])
    bad = _checkpoint(
        tmp_path,
        "tiny-llama",
        {"model.layers.1.mlp.down_proj.weight": good, "model.nope.weight": good.clone()},
    )
    with pytest.raises(ValidationError, match=r"unknown parameter model\.nope\.weight"):
        engine.load_checkpoint("v8", str(bad))
    other = _checkpoint(tmp_path, "gemma3-270m", {"model.layers.1.mlp.down_proj.weight": good})
    with pytest.raises(ValidationError, match="cannot load into"):
        engine.load_checkpoint("v9", str(other))
    assert all(torch.equal(p, before[n]) for n, p in engine.model.named_parameters())
    assert engine.model_version == "base"
