"""Weight precision for the torch engine on CPUs: what each variant does and where it may not go.

* ``float32``: the reference.
* ``bfloat16``: weights, activations and KV cache in bf16 (AVX-512 BF16 kernels where present).
* ``int8-weight``: weight-only int8 with one scale per output channel; activations stay float and
  are cast to bf16 for torch's int8-weight GEMM (``torch._weight_int8pack_mm``). A quarter of the
  fp32 weight bytes per token, and quality close to bf16.
* ``int8``: torch's dynamic quantisation (int8 weights *and* activations quantised per tensor at run
  time, VNNI kernels). Fast, but LLM activations have outliers: on SmolLM2 it changes the top
  token about half the time (``bench/engine.py`` measures it), so it stays an experiment.

Both int8 variants keep the linear layers of the last ``keep_float_layers`` decoder layers in float:
that is where per-user LoRA adapters and the PPO trainer's merged checkpoints go (peft wraps, and
checkpoints overwrite, float linear layers only).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

PRECISIONS = ("float32", "bfloat16", "int8-weight", "int8")


def kv_dtype(precision: str) -> torch.dtype:
    return torch.bfloat16 if precision == "bfloat16" else torch.float32


class Int8WeightLinear(nn.Module):
    """A linear layer with int8 weights (per-output-channel scales) and float activations."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        w = linear.weight.detach().float()
        scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-8)
        self.register_buffer("weight_int8", torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scales", scales.to(torch.bfloat16))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())
        self.in_features, self.out_features = linear.in_features, linear.out_features

    weight_int8: torch.Tensor
    scales: torch.Tensor
    bias: torch.Tensor | None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch._weight_int8pack_mm(x.reshape(-1, shape[-1]).to(torch.bfloat16), self.weight_int8, self.scales)
        y = y.to(x.dtype).reshape(*shape[:-1], self.out_features)
        return y + self.bias if self.bias is not None else y


def _quantisable(model: Any, keep_float_layers: int) -> set[str]:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    layers = int(cfg.num_hidden_layers)
    keep = {f"layers.{i}." for i in range(max(layers - keep_float_layers, 0), layers)}
    return {name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and not any(k in name + "." for k in keep)}


def apply_precision(model: Any, precision: str, keep_float_layers: int = 4) -> Any:
    """The model in ``precision`` (see the module docstring); ``float32`` returns it unchanged."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}; known: {PRECISIONS}")
    if precision == "bfloat16":
        return model.to(torch.bfloat16)
    if precision == "int8":
        spec = dict.fromkeys(_quantisable(model, keep_float_layers), torch.ao.quantization.default_dynamic_qconfig)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao's deprecation notice; the kernels are current
            return torch.ao.quantization.quantize_dynamic(model, spec, dtype=torch.qint8)
    if precision == "int8-weight":
        for name in _quantisable(model, keep_float_layers):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, Int8WeightLinear(getattr(parent, child)))
        # A tied LM head was replaced by its own int8 copy; the input embedding keeps the float weight.
        if hasattr(model.config, "tie_word_embeddings"):
            model.config.tie_word_embeddings = False
    return model


def weight_bytes(model: Any) -> int:
    """Bytes of weights one decode step reads: every linear layer (float, int8-weight or dynamically
    quantised) and the norms; the input embedding is a row lookup and is not counted."""
    total = 0
    for name, module in model.named_modules():
        if isinstance(module, Int8WeightLinear):
            total += module.weight_int8.numel() + module.scales.numel() * module.scales.element_size()
        elif isinstance(module, nn.Linear):
            total += module.weight.numel() * module.weight.element_size()
        elif "quantized" in type(module).__module__ and callable(getattr(module, "weight", None)):
            total += int(module.weight().numel())  # torch.ao dynamic int8: one byte per weight
        elif "norm" in name.rsplit(".", 1)[-1].lower():
            total += sum(p.numel() * p.element_size() for p in module.parameters(recurse=False))
    return total
