"""Factories for engine tests: a tiny random Llama and a byte-level tokenizer (no downloads)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from workers.engines.torch_engine import TorchEngine

EOS = 1
PAD = 0
OFFSET = 3  # ids 0..2 are special; byte b is id b + OFFSET


class ByteTokenizer:
    """UTF-8 bytes as tokens: enough for engines that only encode, decode and know EOS/PAD."""

    eos_token_id = EOS
    pad_token_id = PAD
    chat_template = None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [b + OFFSET for b in text.encode()]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(i - OFFSET for i in ids if i >= OFFSET).decode("utf-8", errors="replace")


def tiny_llama(seed: int = 0, vocab: int = 256 + OFFSET) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=2,
        eos_token_id=EOS,
        pad_token_id=PAD,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg)
    # Widen the logits so greedy decoding has clear winners (random init gives near-ties).
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model.eval()


def make_adapter(tmp_path: Path, name: str, seed: int) -> Path:
    """A peft LoRA directory for ``tiny_llama`` with non-zero B matrices (so it changes outputs)."""
    torch.manual_seed(seed)
    cfg = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    peft_model = get_peft_model(tiny_llama(), cfg)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    out = tmp_path / name
    peft_model.save_pretrained(str(out))
    return out


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture
def tokenizer() -> ByteTokenizer:
    return ByteTokenizer()


@pytest.fixture
def engine(tokenizer: ByteTokenizer) -> TorchEngine:
    return TorchEngine(tiny_llama(), tokenizer, "tiny-llama", device="cpu", eos_token_ids=[EOS])
