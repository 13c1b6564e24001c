"""A tiny random Llama and a byte tokenizer: real torch + peft code paths, no downloads."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

EOS = 1
OFFSET = 3


class ByteTokenizer:
    """UTF-8 bytes as tokens (ids 0..2 special); no chat template, like a raw prompt engine."""

    eos_token_id = EOS
    pad_token_id = 0
    chat_template = None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [b + OFFSET for b in text.encode()]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(i - OFFSET for i in ids if i >= OFFSET).decode("utf-8", errors="replace")


def tiny_llama(seed: int = 0, layers: int = 3) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=256 + OFFSET, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=2, eos_token_id=EOS, pad_token_id=0, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()
