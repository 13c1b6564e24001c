"""Per-user CoMiGS mixtures served on the torch engine: in one batch with a peft LoRA user and a
base user, every row gets exactly its own model; the serving layer is the training layer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel

from models.adapters.mixture import MixtureSet, MixtureSpec, build_layers, read_mixture, write_mixture
from models.adapters.pin import write_pin
from tests.unit.engines.conftest import EOS, ByteTokenizer, make_adapter, tiny_llama
from tests.unit.engines.test_torch_engine import _run, _tokens
from workers.engines.base import SamplingParams
from workers.engines.torch_engine import TorchEngine


def make_mixture(tmp_path: Path, name: str, seed: int, n_specialists: int = 1) -> Path:
    torch.manual_seed(seed)
    spec = MixtureSpec(layers=(1,), n_specialists=n_specialists, rank=4)
    layers = build_layers(tiny_llama(), spec)
    with torch.no_grad():
        for layer in layers:
            for pname, p in layer.named_parameters():
                if pname.endswith(".B") or pname.startswith("router"):
                    p.normal_(0, 2.0)
    out = tmp_path / name
    out.mkdir()
    write_mixture(out, spec, layers)
    write_pin(out, "tiny", "base")
    return out


def greedy(model: torch.nn.Module, mixtures: MixtureSet | None, key: str | None, prompt: str, n: int) -> list[int]:
    ids = ByteTokenizer().encode(prompt)
    out: list[int] = []
    for _ in range(n):
        if mixtures is not None:
            mixtures.select([key])
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids + out])).logits[0, -1]
        out.append(int(logits.argmax()))
    return out


def test_the_serving_hook_computes_the_trained_mixture_layer(tmp_path: Path) -> None:
    directory = make_mixture(tmp_path, "m", 3, n_specialists=2)
    model = tiny_llama()
    mixtures = MixtureSet(model)
    mixtures.load("m", directory)
    spec, state = read_mixture(directory)
    x = torch.randn(3, 5, 64)
    mlp = model.model.layers[1].mlp
    layer = build_layers(tiny_llama(), spec)[0]
    layer.load_state_dict({k.split(".", 1)[1]: v for k, v in state.items()})
    with torch.no_grad(), mixtures.selected(["m", None, "m"]):
        out = mlp(x)
    with torch.no_grad():
        assert torch.allclose(out[[0, 2]], layer(x[[0, 2]]), atol=1e-6)
        assert torch.allclose(out[1], mlp.forward(x[1:2])[0], atol=1e-6)  # no hook output change for None
    with pytest.raises(KeyError):
        mixtures.select(["other"])


def test_a_mixture_a_lora_adapter_and_the_base_share_one_batch(tmp_path: Path) -> None:
    engine = TorchEngine(tiny_llama(), ByteTokenizer(), "tiny", device="cpu", eos_token_ids=[EOS])
    lora_dir = make_adapter(tmp_path, "lora", 1)
    mix_a, mix_b = make_mixture(tmp_path, "mix-a", 2), make_mixture(tmp_path, "mix-b", 5)
    engine.load_adapter("hash-lora", str(lora_dir))
    engine.load_adapter("hash-mix-a", str(mix_a))
    engine.load_adapter("hash-mix-b", str(mix_b))
    assert set(engine.adapters) == {"hash-lora", "hash-mix-a", "hash-mix-b"}
    sp = SamplingParams(max_tokens=10, ignore_eos=True)
    jobs = {r: ("hello world", sp, a) for r, a in
            (("base", None), ("lora", "hash-lora"), ("a", "hash-mix-a"), ("b", "hash-mix-b"))}
    mixed = _run(engine, jobs, {"base": 0, "lora": 0, "a": 0, "b": 2})
    alone_a = MixtureSet(reference_a := tiny_llama())
    alone_a.load("a", mix_a)
    alone_b = MixtureSet(reference_b := tiny_llama())
    alone_b.load("b", mix_b)
    assert _tokens(mixed["a"]) == greedy(reference_a, alone_a, "a", "hello world", 10)
    assert _tokens(mixed["b"]) == greedy(reference_b, alone_b, "b", "hello world", 10)
    assert _tokens(mixed["base"]) == greedy(tiny_llama(), None, None, "hello world", 10)
    peft = PeftModel.from_pretrained(tiny_llama(), str(lora_dir)).eval()
    assert _tokens(mixed["lora"]) == greedy(peft, None, None, "hello world", 10)
    assert _tokens(mixed["a"]) != _tokens(mixed["base"]) != _tokens(mixed["b"])  # the mixtures change the model
    engine.unload_adapter("hash-mix-a")
    assert "hash-mix-a" not in engine.adapters
