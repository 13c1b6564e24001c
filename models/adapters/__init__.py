"""Per-user LoRA adapters: the online trainer the personalisation agent calls.

``AdapterTrainer(model, tokenizer, AdapterConfig(), store_root).update(user_id, pairs, sft_targets,
previous_adapter_dir, lr, steps, time_budget_s) -> AdapterUpdate(hash, path, metrics)``; the
stored directory is a peft LoRA adapter the inference engine loads by its content hash.
"""

from models.adapters.trainer import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    AdapterConfig,
    AdapterTrainer,
    AdapterUpdate,
)
from models.adapters.trunk import ChatEncoder, EncodedPair, TrunkScorer

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "AdapterConfig",
    "AdapterTrainer",
    "AdapterUpdate",
    "ChatEncoder",
    "EncodedPair",
    "TrunkScorer",
]
