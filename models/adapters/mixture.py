"""Per-user CoMiGS mixtures on a frozen base model: the file format and serving them side by side.

A *mixture* adapts the MLPs of a few decoder layers with ``core.moe.lora_moe.MoELoRAMLP``:
generalist LoRA experts (shared across users, averaged each round), the user's specialists and a
token router. On disk (one content-addressed directory per version):

- ``mixture.json``: the shape (``MixtureSpec``: adapted layers, experts, rank, top-k);
- ``mixture.safetensors``: every expert's and router's tensors, ``layer<i>.<param>``. The
  generalists it was trained with are included, so a directory is a complete, immutable mixture;
- ``flywheel.json``: the base model and base *version* it was trained on (``pinning``).

``MixtureSet`` serves any number of mixtures on one model: a forward hook on each adapted MLP
replaces the output rows of the requests whose mixture is selected for this forward
(``select``), computed from the MLP's *plain* base linears. Rows without a mixture keep the MLP's
own output, so peft LoRA adapters of other users in the same batch are untouched (peft's
per-row adapter routing sees the full batch, as it expects). The trainer uses the same hook with
one working mixture selected for every row.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from core.moe.lora_moe import MoELoRAConfig, MoELoRAMLP

MIXTURE_CONFIG = "mixture.json"
MIXTURE_WEIGHTS = "mixture.safetensors"


@dataclass(frozen=True)
class MixtureSpec:
    """The shape of one user's mixture."""

    layers: tuple[int, ...]
    """Decoder layers whose MLP carries the mixture."""
    n_generalists: int = 1
    n_specialists: int = 1
    rank: int = 8
    alpha: float = 16.0
    top_k: int = 2
    generalist_share: float = 0.5

    def __post_init__(self) -> None:
        if not self.layers or len(set(self.layers)) != len(self.layers):
            raise ValueError(f"a mixture needs distinct adapted layers, got {self.layers}")
        self.moe()  # validates the expert counts, rank and top-k

    def moe(self) -> MoELoRAConfig:
        return MoELoRAConfig(n_generalists=self.n_generalists, n_specialists=self.n_specialists, rank=self.rank,
                             alpha=self.alpha, top_k=self.top_k, generalist_share=self.generalist_share)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "layers": list(self.layers)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> MixtureSpec:
        return cls(**{**data, "layers": tuple(int(i) for i in data["layers"])})


def is_mixture(path: Path | str) -> bool:
    return (Path(path) / MIXTURE_CONFIG).exists()


def _decoder_layers(model: Any) -> Any:
    inner = model
    for _ in range(5):
        if hasattr(inner, "layers") and hasattr(inner, "embed_tokens"):
            return inner.layers
        inner = inner.model if hasattr(inner, "model") else inner.base_model
    raise ValueError(f"cannot find the decoder layers in {type(model).__name__}")


def _plain(linear: Any) -> nn.Module:
    """The frozen base ``nn.Linear`` of a possibly peft-wrapped linear layer."""
    base = getattr(linear, "base_layer", linear)
    assert isinstance(base, nn.Module)
    return base


class PlainMLP:
    """A Llama MLP's base projections without any peft wrapping (what a mixture adapts)."""

    def __init__(self, mlp: Any) -> None:
        self.gate_proj = _plain(mlp.gate_proj)
        self.up_proj = _plain(mlp.up_proj)
        self.down_proj = _plain(mlp.down_proj)
        self.act_fn = mlp.act_fn

    def __call__(self, x: Tensor) -> Tensor:
        out: Tensor = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
        return out


def build_layers(model: Any, spec: MixtureSpec) -> list[MoELoRAMLP]:
    """Fresh mixture layers (every expert equals the base: LoRA B starts at zero) on ``model``."""
    decoder_layers = _decoder_layers(model)
    return [MoELoRAMLP(PlainMLP(decoder_layers[i].mlp), spec.moe()) for i in spec.layers]


def mixture_state(layers: Sequence[MoELoRAMLP]) -> dict[str, Tensor]:
    return {f"layer{i}.{name}": t.detach().float().contiguous().clone()
            for i, layer in enumerate(layers) for name, t in layer.state_dict().items()}


@torch.no_grad()
def load_mixture_state(layers: Sequence[MoELoRAMLP], state: dict[str, Tensor]) -> None:
    """Copy a saved state in; refuses a state of another shape before changing anything."""
    params = {f"layer{i}.{name}": p for i, layer in enumerate(layers) for name, p in layer.state_dict().items()}
    wrong = sorted(set(params) ^ set(state)) or [k for k in state if params[k].shape != state[k].shape]
    if wrong:
        raise ValueError(f"mixture tensors do not fit this shape: {wrong[:4]}")
    for name, tensor in state.items():
        params[name].copy_(tensor)


def write_mixture(directory: Path, spec: MixtureSpec, layers: Sequence[MoELoRAMLP]) -> None:
    from safetensors.torch import save_file

    save_file(mixture_state(layers), str(directory / MIXTURE_WEIGHTS), metadata={"format": "pt"})
    (directory / MIXTURE_CONFIG).write_text(json.dumps(spec.to_json(), sort_keys=True, indent=2))


def read_mixture(directory: Path) -> tuple[MixtureSpec, dict[str, Tensor]]:
    from safetensors.torch import load_file

    spec = MixtureSpec.from_json(json.loads((directory / MIXTURE_CONFIG).read_text()))
    return spec, load_file(str(directory / MIXTURE_WEIGHTS))


class MixtureSet:
    """Mixtures served side by side on one model (rows of a batch pick theirs with ``select``)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.decoder_layers = _decoder_layers(model)
        self.mixtures: dict[str, tuple[MixtureSpec, list[MoELoRAMLP]]] = {}
        self._hooks: dict[int, Any] = {}
        self._rows: tuple[str | None, ...] = ()

    def add(self, key: str, spec: MixtureSpec, layers: list[MoELoRAMLP]) -> None:
        """Serve ``layers`` (built on this model) under ``key``."""
        for index in spec.layers:
            if index not in self._hooks:
                mlp = self.decoder_layers[index].mlp
                self._hooks[index] = mlp.register_forward_hook(self._hook_for(index))
        self.mixtures[key] = (spec, layers)

    def load(self, key: str, path: Path | str) -> MixtureSpec:
        """Load a mixture directory under ``key``, in the model's dtype and device."""
        spec, state = read_mixture(Path(path))
        layers = build_layers(self.model, spec)
        load_mixture_state(layers, state)
        weight = layers[0].base.down_proj.weight
        for layer in layers:
            layer.to(dtype=weight.dtype, device=weight.device)
            layer.requires_grad_(False)
            layer.eval()
        self.add(key, spec, layers)
        return spec

    def remove(self, key: str) -> None:
        self.mixtures.pop(key, None)

    def select(self, rows: Sequence[str | None]) -> None:
        """The mixture of each row of the next forward passes (None: the model's own MLP)."""
        unknown = {r for r in rows if r is not None and r not in self.mixtures}
        if unknown:
            raise KeyError(f"mixtures not loaded: {sorted(unknown)}")
        self._rows = tuple(rows)

    @contextmanager
    def selected(self, rows: Sequence[str | None]) -> Iterator[None]:
        previous = self._rows
        self.select(rows)
        try:
            yield
        finally:
            self._rows = previous

    def _hook_for(self, index: int) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
            rows = self._rows
            if not any(rows):
                return output
            x = args[0]
            if x.shape[0] != len(rows):
                raise ValueError(f"{len(rows)} rows selected for a batch of {x.shape[0]}")
            out = output.clone()
            for key in sorted({r for r in rows if r is not None}):
                spec, layers = self.mixtures[key]
                if index not in spec.layers:
                    continue
                idx = torch.tensor([i for i, r in enumerate(rows) if r == key], device=x.device)
                out[idx] = layers[spec.layers.index(index)](x[idx]).to(out.dtype)
            return out

        return hook
