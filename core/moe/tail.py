"""Train only the last layers of a frozen Llama from cached hidden states.

The base model is frozen and only the MLPs of the last ``n`` decoder layers are adapted, so the
hidden states entering layer ``L - n`` never change: compute them once (``cache_hidden_states``)
and every training or evaluation step runs just ``n`` layers, the final norm and the LM head.
``TailLM.loss`` takes the per-user MLP replacements as an argument, so one frozen model serves
all users without copying it.

The decoder layer is re-stated here (pre-norm attention, residual, pre-norm MLP, residual: the
same as ``LlamaDecoderLayer.forward``) so the MLP can be swapped per call; the tests check the
result equals the HF model's. Attention runs with SDPA's causal mask and no padding (all chunks
are full length).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn


def _decoder_layer(
    layer: Any, hidden: Tensor, pos_emb: tuple[Tensor, Tensor], positions: Tensor, mlp: nn.Module
) -> Tensor:
    residual = hidden
    attn, _ = layer.self_attn(
        hidden_states=layer.input_layernorm(hidden),
        attention_mask=None,
        position_ids=positions,
        position_embeddings=pos_emb,
    )
    hidden = residual + attn
    out: Tensor = hidden + mlp(layer.post_attention_layernorm(hidden))
    return out


class TailLM:
    """Layers ``[first_layer:]`` + norm + LM head of a frozen Llama causal LM."""

    def __init__(self, model: Any, first_layer: int) -> None:
        backbone = model.model
        n_layers = len(backbone.layers)
        if not 0 <= first_layer < n_layers:
            raise ValueError(f"first_layer must be in 0..{n_layers - 1}, got {first_layer}")
        for p in model.parameters():
            p.requires_grad_(False)
        self.model = model
        self.first_layer = first_layer
        self.layers = list(backbone.layers)[first_layer:]
        self.norm = backbone.norm
        self.lm_head = model.lm_head
        self.rotary = backbone.rotary_emb

    def base_mlps(self) -> list[Any]:
        return [layer.mlp for layer in self.layers]

    def logits(self, hidden: Tensor, mlps: Sequence[nn.Module] | None = None) -> Tensor:
        """Logits for hidden states entering ``first_layer``; ``mlps`` replace the layers' MLPs."""
        mlps = self.base_mlps() if mlps is None else mlps
        if len(mlps) != len(self.layers):
            raise ValueError(f"need {len(self.layers)} MLPs, got {len(mlps)}")
        positions = torch.arange(hidden.shape[1]).unsqueeze(0)
        pos_emb = self.rotary(hidden, position_ids=positions)
        for layer, mlp in zip(self.layers, mlps, strict=True):
            hidden = _decoder_layer(layer, hidden, pos_emb, positions, mlp)
        out: Tensor = self.lm_head(self.norm(hidden))
        return out

    def token_nll(self, hidden: Tensor, ids: Tensor, mlps: Sequence[nn.Module] | None = None) -> Tensor:
        """Per-token negative log-likelihood of ``ids[:, 1:]`` (shape ``(batch, seq-1)``)."""
        logits = self.logits(hidden, mlps)[:, :-1]
        return torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1), reduction="none"
        ).reshape(ids.shape[0], -1)

    def loss(self, hidden: Tensor, ids: Tensor, mlps: Sequence[nn.Module] | None = None) -> Tensor:
        """Mean next-token cross-entropy."""
        return self.token_nll(hidden, ids, mlps).mean()


@torch.no_grad()
def cache_hidden_states(model: Any, ids: Tensor, first_layer: int, batch_size: int = 8) -> Tensor:
    """Hidden states entering decoder layer ``first_layer`` for full-length chunks ``ids``."""
    backbone = model.model
    out = []
    for start in range(0, ids.shape[0], batch_size):
        chunk = ids[start : start + batch_size]
        hidden = backbone.embed_tokens(chunk)
        positions = torch.arange(chunk.shape[1]).unsqueeze(0)
        pos_emb = backbone.rotary_emb(hidden, position_ids=positions)
        for layer in list(backbone.layers)[:first_layer]:
            hidden = _decoder_layer(layer, hidden, pos_emb, positions, layer.mlp)
        out.append(hidden)
    return torch.cat(out)
