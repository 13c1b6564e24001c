"""Grouped-query SDPA for explicit masks.

transformers' ``sdpa`` path repeats K and V once per query group whenever a mask is given
(``repeat_kv``), which on SmolLM2 (9 query heads, 3 KV heads) copies the whole KV window three
times per layer per step: with 32 rows over 300 tokens that is ~20 ms of a ~25 ms attention call
on a CPU. ``torch``'s SDPA accepts the grouping itself (``enable_gqa``) together with a mask, so
this registers an attention function that does exactly that, plus the stock SDPA mask builder
under the same name for code paths (``generate``) that let transformers build masks.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "flywheel_gqa_sdpa"


def gqa_sdpa_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                       is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    causal = attention_mask is None and query.shape[2] > 1 and (is_causal is None or is_causal)
    if attention_mask is not None and attention_mask.shape[-1] != key.shape[-2]:
        attention_mask = attention_mask[..., : key.shape[-2]]
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=0.0, scale=scaling, is_causal=causal,
        enable_gqa=query.shape[1] != key.shape[1],
    )
    return out.transpose(1, 2).contiguous(), None


def use_gqa_sdpa(model: Any) -> None:
    """Switch a transformers model to grouped-query SDPA (idempotent)."""
    if NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(NAME, gqa_sdpa_attention)
        AttentionMaskInterface.register(NAME, sdpa_mask)
    model.set_attn_implementation(NAME)
