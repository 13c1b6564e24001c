"""Checkpoints in the format the inference engine hot-loads.

A checkpoint is a directory with

- ``model.safetensors``: a full or *partial* state dict in the base HF model's own parameter
  names (``model.layers.29.mlp.down_proj.weight``). For a LoRA-trained actor only the touched
  modules are written, with the adapter merged: ``W + scaling * B @ A``;
- ``checkpoint.json``: ``{"base_model": name, "version": str, "step": int}``.

The engine copies those tensors into its live base weights, so a partial checkpoint must always
be relative to the *base* weights (not to the previous checkpoint): merged weights are, because
the LoRA's base weights never change. Directories are stored content-addressed with
``core.artifacts.store_directory``.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from core.artifacts import store_directory

WEIGHTS_FILE = "model.safetensors"
META_FILE = "checkpoint.json"
_PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class CheckpointMeta:
    base_model: str
    version: str
    step: int


def _is_lora_layer(module: nn.Module) -> bool:
    return hasattr(module, "base_layer") and hasattr(module, "get_delta_weight") and hasattr(module, "lora_A")


def export_actor_weights(actor: nn.Module) -> dict[str, Tensor]:
    """The actor's weights to publish, in base-model names.

    A peft model yields only its LoRA-wrapped modules, merged (``W + delta``); a plain model
    yields its full state dict. Tensors are detached, contiguous copies (safetensors refuses
    shared storage, e.g. tied embeddings).
    """
    lora_modules = [(name, m) for name, m in actor.named_modules() if _is_lora_layer(m)]
    if not lora_modules:
        return {name: t.detach().contiguous().clone() for name, t in actor.state_dict().items()}
    out: dict[str, Tensor] = {}
    for name, module in lora_modules:
        base = module.base_layer
        weight = base.weight.detach().clone()
        for adapter in module.active_adapters:
            if adapter in module.lora_A:
                weight += module.get_delta_weight(adapter).detach().to(weight.dtype)
        base_name = name[len(_PEFT_PREFIX) :] if name.startswith(_PEFT_PREFIX) else name
        out[f"{base_name}.weight"] = weight.contiguous()
        if getattr(base, "bias", None) is not None:
            out[f"{base_name}.bias"] = base.bias.detach().contiguous().clone()
    return out


def write_checkpoint(weights: dict[str, Tensor], meta: CheckpointMeta, store_root: Path) -> tuple[str, Path]:
    """Write the checkpoint into a temporary directory and store it content-addressed.

    Returns ``(sha256, stored directory)``; writing the same weights and meta twice yields the
    same name.
    """
    with tempfile.TemporaryDirectory(prefix=".ckpt-", dir=_ensure(store_root)) as tmp:
        work = Path(tmp)
        save_file(weights, str(work / WEIGHTS_FILE))
        (work / META_FILE).write_text(
            json.dumps({"base_model": meta.base_model, "version": meta.version, "step": meta.step}, sort_keys=True)
        )
        return store_directory(work, store_root)


def _ensure(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def read_checkpoint(path: Path) -> tuple[CheckpointMeta, dict[str, Tensor]]:
    meta = json.loads((path / META_FILE).read_text())
    return CheckpointMeta(meta["base_model"], str(meta["version"]), int(meta["step"])), load_file(
        str(path / WEIGHTS_FILE)
    )


@torch.no_grad()
def apply_checkpoint(model: nn.Module, path: Path) -> CheckpointMeta:
    """Copy a checkpoint's tensors into a base HF model, as the engine's hot-load does.

    Raises ``KeyError`` naming tensors the model lacks and ``ValueError`` on a shape mismatch, so
    a checkpoint for a different base model is never half-applied.
    """
    meta, weights = read_checkpoint(path)
    params = model.state_dict(keep_vars=True)  # includes tied aliases such as lm_head.weight
    missing = sorted(set(weights) - set(params))
    if missing:
        raise KeyError(f"checkpoint tensors not in the model: {missing[:5]}")
    for name, tensor in weights.items():
        if params[name].shape != tensor.shape:
            raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} != model {tuple(params[name].shape)}")
    for name, tensor in weights.items():
        params[name].copy_(tensor)
    return meta
