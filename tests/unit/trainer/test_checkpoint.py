"""Checkpoint format: merged LoRA weights under base names, content addressing, hot-load."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaForCausalLM

from workers.trainer.checkpoint import (
    CheckpointMeta,
    apply_checkpoint,
    export_actor_weights,
    read_checkpoint,
    write_checkpoint,
)
from workers.trainer.models import tiny_llama_config


def lora_actor() -> tuple[LlamaForCausalLM, Any]:
    torch.manual_seed(0)
    base = LlamaForCausalLM(tiny_llama_config(num_layers=3))
    pristine = copy.deepcopy(base)
    peft_model = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, target_modules=["down_proj", "q_proj"], layers_to_transform=[2])
    )
    with torch.no_grad():  # a trained adapter: B is no longer zero
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    return pristine, peft_model


def test_lora_export_is_partial_merged_and_in_base_names(tmp_path: Path) -> None:
    pristine, actor = lora_actor()
    weights = export_actor_weights(actor)
    assert set(weights) == {"model.layers.2.mlp.down_proj.weight", "model.layers.2.self_attn.q_proj.weight"}
    merged = copy.deepcopy(actor).merge_and_unload()
    for name, tensor in weights.items():
        assert torch.allclose(tensor, merged.state_dict()[name], atol=1e-6)
    digest, path = write_checkpoint(weights, CheckpointMeta("tiny-llama", "v3", 3), tmp_path)
    # Hot-load into the untouched base: it now computes what the LoRA actor computes.
    apply_checkpoint(pristine, path)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        assert torch.allclose(pristine(input_ids=ids).logits, actor(input_ids=ids).logits, atol=1e-5)
    meta, _ = read_checkpoint(path)
    assert meta == CheckpointMeta("tiny-llama", "v3", 3)
    again, _ = write_checkpoint(weights, CheckpointMeta("tiny-llama", "v3", 3), tmp_path)
    assert again == digest == path.name


def test_apply_checkpoint_refuses_foreign_tensors(tmp_path: Path) -> None:
    pristine, _ = lora_actor()
    _, path = write_checkpoint(
        {"model.layers.9.mlp.up_proj.weight": torch.zeros(2, 2)}, CheckpointMeta("x", "v1", 1), tmp_path
    )
    with pytest.raises(KeyError, match=r"layers\.9"):
        apply_checkpoint(pristine, path)
    _, path = write_checkpoint(
        {"model.layers.0.mlp.up_proj.weight": torch.zeros(2, 2)}, CheckpointMeta("x", "v1", 1), tmp_path
    )
    with pytest.raises(ValueError, match="shape"):
        apply_checkpoint(pristine, path)
