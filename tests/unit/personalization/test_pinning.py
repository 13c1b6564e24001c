"""Version pinning: an adapter is served only on the base version it was trained on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from core.errors import ValidationError
from core.personalization.pinning import servable
from models.adapters.pin import read_pin, write_pin
from tests.unit.engines.conftest import EOS, ByteTokenizer, make_adapter, tiny_llama
from tests.unit.moe.test_mixture_serving import make_mixture
from workers.engines.base import EngineRequest, SamplingParams
from workers.engines.torch_engine import TorchEngine
from workers.serving import FinalEvent, ServeRequest, ServingLoop


def test_the_rule() -> None:
    assert servable("v3", "v3")
    assert not servable("v3", "v4")
    assert not servable("v3", "base")
    assert servable(None, "base") and not servable(None, "v1")  # unpinned adapters predate versions


def checkpoint(tmp_path: Path, version: str) -> Path:
    d = tmp_path / f"ckpt-{version}"
    d.mkdir()
    weight = tiny_llama(seed=9).model.layers[1].mlp.down_proj.weight.detach().clone()
    save_file({"model.layers.1.mlp.down_proj.weight": weight}, str(d / "model.safetensors"))
    (d / "checkpoint.json").write_text(json.dumps({"base_model": "tiny", "version": version, "step": 1}))
    return d


@pytest.mark.parametrize("kind", ["lora", "mixture"])
def test_pinning_refuses_a_mismatched_adapter(tmp_path: Path, kind: str) -> None:
    directory = make_adapter(tmp_path, "a", 1) if kind == "lora" else make_mixture(tmp_path, "a", 1)
    write_pin(directory, "tiny", "base")
    assert read_pin(directory) == ("tiny", "base")
    engine = TorchEngine(tiny_llama(), ByteTokenizer(), "tiny", device="cpu", eos_token_ids=[EOS])
    engine.load_adapter("hash-a", str(directory))
    sp = SamplingParams(max_tokens=4, ignore_eos=True)
    engine.submit(EngineRequest("ok", (5, 6, 7), sp, "hash-a"))  # trained on base, served on base
    engine.release("ok")
    engine.load_checkpoint("v1", str(checkpoint(tmp_path, "v1")))
    assert not engine.adapter_servable("hash-a")
    with pytest.raises(ValidationError, match="trained on base base"):
        engine.submit(EngineRequest("refused", (5, 6, 7), sp, "hash-a"))
    # The serving loop serves such a request with the base alone and says so in the final.
    loop = ServingLoop(engine)
    loop.admit(ServeRequest("r", "hello", sp, adapter="hash-a"))
    finals: list[FinalEvent] = []
    while loop.has_work():
        finals += [e for e in loop.step() if isinstance(e, FinalEvent)]
    assert finals[0].adapter_version == "" and finals[0].model_version == "v1"
    # An adapter re-based onto v1 is served again.
    write_pin(directory, "tiny", "v1")
    engine.load_adapter("hash-a-v1", str(directory))
    assert engine.adapter_servable("hash-a-v1")
    torch.manual_seed(0)
