"""Checkpoints in the format the inference engine hot-loads.

A checkpoint is a directory with

- ``model.safetensors``: a full or *partial* state dict in the base HF model's own parameter
  names (``model.layers.29.mlp.down_proj.weight``). For a LoRA-trained actor only the touched
  modules are written, with the adapter merged: ``W + scaling * B @ A``;
- ``checkpoint.json``: ``{"base_model": name, "version": str, "step": int}``;
- ``trainer_state.safetensors`` (optional, ignored by the engine): the trainer's own trainable
  tensors (the actor's LoRA or weights, the critic's trainable layers, named ``actor.*`` and
  ``critic.*``), so a restarted trainer continues from exactly the published policy with the
  original base as its KL reference (re-merging the published weights into the base would move
  the reference).

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
STATE_FILE = "trainer_state.safetensors"
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


def trainable_state(actor: nn.Module, critic: nn.Module) -> dict[str, Tensor]:
    """The tensors training changes, named ``actor.<param>`` / ``critic.<param>``."""
    out: dict[str, Tensor] = {}
    for prefix, module in (("actor", actor), ("critic", critic)):
        for name, p in module.named_parameters():
            if p.requires_grad:
                out[f"{prefix}.{name}"] = p.detach().contiguous().clone()
    return out


@torch.no_grad()
def load_trainable_state(actor: nn.Module, critic: nn.Module, state: dict[str, Tensor]) -> None:
    """Copy ``trainable_state`` tensors back; refuses unknown names or shapes before copying any."""
    params = {f"actor.{n}": p for n, p in actor.named_parameters()}
    params.update({f"critic.{n}": p for n, p in critic.named_parameters()})
    wrong = [n for n, t in state.items() if n not in params or params[n].shape != t.shape]
    if wrong:
        raise ValueError(f"trainer state does not fit these models: {wrong[:5]}")
    for name, tensor in state.items():
        params[name].copy_(tensor)


def read_trainable_state(path: Path) -> dict[str, Tensor] | None:
    file = path / STATE_FILE
    return load_file(str(file)) if file.exists() else None


def write_checkpoint(
    weights: dict[str, Tensor], meta: CheckpointMeta, store_root: Path, state: dict[str, Tensor] | None = None
) -> tuple[str, Path]:
    """Write the checkpoint into a temporary directory and store it content-addressed.

    Returns ``(sha256, stored directory)``; writing the same weights and meta twice yields the
    same name. ``state`` (``trainable_state``) is stored alongside for resuming.
    """
    with tempfile.TemporaryDirectory(prefix=".ckpt-", dir=_ensure(store_root)) as tmp:
        work = Path(tmp)
        save_file(weights, str(work / WEIGHTS_FILE))
        if state is not None:
            save_file(state, str(work / STATE_FILE))
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


@torch.no_grad()
def load_merged_weights(actor: nn.Module, weights: dict[str, Tensor]) -> None:
    """Load published engine weights (base-model names) into a possibly peft-wrapped actor.

    For checkpoints without a trainer state: a LoRA actor's merged weights (W + BA) go into the
    wrapped layers' ``base_layer`` while the LoRA keeps its values, so the actor equals the
    published policy only if the LoRA is zero, and the KL reference moves with the base.
    """
    params = actor.state_dict(keep_vars=True)
    for name, tensor in weights.items():
        stem = name[: -len(".weight")] if name.endswith(".weight") else name
        for candidate in (name, f"{_PEFT_PREFIX}{name}", f"{_PEFT_PREFIX}{stem}.base_layer.weight"):
            if candidate in params and params[candidate].shape == tensor.shape:
                params[candidate].copy_(tensor)
                break
        else:
            raise KeyError(f"checkpoint tensor {name} has no place in the actor")

