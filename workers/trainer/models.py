"""The PPO models: actor, reference and critic (and, in the benchmark only, a reward network).

Two builds:

- ``build_tiny_models``: tiny Llama-style configs (``transformers.LlamaConfig``) with random
  weights, for tests and the fusion benchmark. The actor is fully trainable; the reference is a
  frozen copy of the initial actor; the critic is a Llama backbone with a scalar head. With
  ``with_reward=True`` a frozen random "reward" network is added: the fusion benchmark measures
  its forward *cost* (RLHFuse's reward-inference task); its values never reach a live PPO step.
- ``build_smollm2_models``: SmolLM2-135M from its PyPI wheel (``models.loader``). The actor
  gets a LoRA (peft) on the MLP and attention projections of its last layers so a CPU step stays
  affordable; the reference is the same network with the adapter disabled (no second copy);
  the critic is the first ``critic_layers`` layers plus a value head. There is no reward model:
  live rewards arrive as Reward events (user feedback, or the rewarder's trained reward model).

Every model runs with SDPA attention and *right-padded* batches with no padding mask: under a
causal mask a valid token only attends to earlier positions, which are all valid, so padding
never changes a valid token's output. Per-token tensors are then read at each row's response
positions (see ``workers.trainer.batch``).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn
from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel

TINY_BASE_MODEL = "tiny-llama"


def tiny_llama_config(
    *,
    vocab_size: int = 256,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 1024,
) -> LlamaConfig:
    """A small Llama config (SDPA attention, untied embeddings so checkpoints hold plain tensors)."""
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    config._attn_implementation = "sdpa"
    return config


class ValueModel(nn.Module):
    """A Llama backbone with a scalar head: per-token values (critic) or a sequence score (reward)."""

    def __init__(self, backbone: LlamaModel) -> None:
        super().__init__()
        self.backbone = backbone
        self.value_head = nn.Linear(backbone.config.hidden_size, 1)
        nn.init.normal_(self.value_head.weight, std=1.0 / (backbone.config.hidden_size + 1))
        nn.init.zeros_(self.value_head.bias)

    @property
    def config(self) -> LlamaConfig:
        config: LlamaConfig = self.backbone.config
        return config

    def forward(self, input_ids: Tensor) -> Tensor:
        """Values ``(batch, seq)`` for right-padded ``input_ids``."""
        hidden = self.backbone(input_ids=input_ids).last_hidden_state
        values: Tensor = self.value_head(hidden).squeeze(-1)
        return values

    def score(self, input_ids: Tensor, lengths: Tensor) -> Tensor:
        """One scalar per row: the value at the row's last valid token."""
        values = self.forward(input_ids)
        rows = torch.arange(values.shape[0], device=values.device)
        return values[rows, lengths - 1]


def truncated_backbone(model: LlamaModel, num_layers: int) -> LlamaModel:
    """A deep copy of ``model`` keeping only its first ``num_layers`` decoder layers."""
    if not 1 <= num_layers <= model.config.num_hidden_layers:
        raise ValueError(f"num_layers must be in 1..{model.config.num_hidden_layers}, got {num_layers}")
    clone = copy.deepcopy(model)
    clone.layers = nn.ModuleList(list(clone.layers)[:num_layers])
    clone.config.num_hidden_layers = num_layers
    return clone


@dataclass
class PolicyModels:
    """Actor, reference, critic and reward, plus what the trainer needs to know about them."""

    actor: nn.Module
    """``LlamaForCausalLM`` or a peft ``PeftModel`` around one."""
    critic: ValueModel
    reward: ValueModel | None
    """Benchmark only (a compute stand-in, see the module docstring); None in every live build."""
    reference: nn.Module | None
    """None: the reference is the actor with its LoRA adapter disabled."""
    base_model: str
    """Catalogue name of the base model, written into checkpoints."""
    pad_token_id: int = 0

    @property
    def uses_lora(self) -> bool:
        return self.reference is None

    @contextmanager
    def reference_mode(self) -> Iterator[nn.Module]:
        """The network to use as the frozen reference policy."""
        if self.reference is not None:
            yield self.reference
            return
        with self.actor.disable_adapter():  # type: ignore[operator]
            yield self.actor

    def actor_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.actor.parameters() if p.requires_grad]

    def critic_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.critic.parameters() if p.requires_grad]


def _freeze(module: nn.Module) -> nn.Module:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def build_tiny_models(config: LlamaConfig | None = None, seed: int = 0, with_reward: bool = False) -> PolicyModels:
    """Random tiny actor/critic/reference (+ the benchmark's reward network), reproducible for a seed.

    The critic starts from the actor's backbone (a common choice when no reward model backbone
    is available); the benchmark's reward network is an independent random backbone, frozen.
    """
    config = config or tiny_llama_config()
    torch.manual_seed(seed)
    actor = LlamaForCausalLM(config)
    reference = _freeze(copy.deepcopy(actor))
    critic = ValueModel(copy.deepcopy(actor.model))
    reward = _freeze(ValueModel(LlamaModel(config))) if with_reward else None
    assert reward is None or isinstance(reward, ValueModel)
    return PolicyModels(
        actor=actor,
        critic=critic,
        reward=reward,
        reference=reference,
        base_model=TINY_BASE_MODEL,
        pad_token_id=config.pad_token_id or 0,
    )


LORA_TARGETS = ("q_proj", "v_proj", "gate_proj", "up_proj", "down_proj")


def lora_policy(
    base: LlamaForCausalLM,
    critic_backbone: LlamaModel,
    *,
    lora_layers: Sequence[int],
    rank: int = 8,
    alpha: float = 16.0,
    critic_trainable_layers: int = 2,
    target_modules: Sequence[str] = LORA_TARGETS,
    base_model: str,
    pad_token_id: int,
) -> PolicyModels:
    """A LoRA actor on ``base`` (the reference is the same network with the adapter disabled) and
    a critic on ``critic_backbone`` of which only the last ``critic_trainable_layers`` layers and
    the value head train."""
    from peft import LoraConfig, get_peft_model

    critic = ValueModel(critic_backbone)
    n_critic = len(critic_backbone.layers)
    for name, p in critic.backbone.named_parameters():
        layer = name.split(".")[1] if name.startswith("layers.") else None
        p.requires_grad_(layer is not None and int(layer) >= n_critic - critic_trainable_layers)
    lora = LoraConfig(
        r=rank,
        lora_alpha=alpha,  # type: ignore[arg-type]  # peft annotates int; a float scale is valid
        lora_dropout=0.0,
        target_modules=list(target_modules),
        layers_to_transform=list(lora_layers),
    )
    actor = get_peft_model(base, lora)
    return PolicyModels(
        actor=actor, critic=critic, reward=None, reference=None, base_model=base_model, pad_token_id=pad_token_id
    )


def build_smollm2_models(
    *,
    lora_layers: Sequence[int] = (26, 27, 28, 29),
    rank: int = 8,
    alpha: float = 16.0,
    critic_layers: int = 8,
    critic_trainable_layers: int = 2,
    target_modules: Sequence[str] = LORA_TARGETS,
) -> tuple[PolicyModels, Any]:
    """SmolLM2-135M actor with a LoRA on ``lora_layers``; returns (models, tokenizer).

    Loads the GGUF once (about 20 s); the critic backbone is a truncated copy of it. Only the
    LoRA, the critic's last ``critic_trainable_layers`` layers and its head train.
    """
    from models.loader import load_model

    loaded = load_model("smollm2-135m")
    base: LlamaForCausalLM = loaded.model
    base.config._attn_implementation = "sdpa"
    tokenizer = loaded.tokenizer
    models = lora_policy(
        base,
        truncated_backbone(base.model, critic_layers),
        lora_layers=lora_layers,
        rank=rank,
        alpha=alpha,
        critic_trainable_layers=critic_trainable_layers,
        target_modules=target_modules,
        base_model=loaded.spec.name,
        pad_token_id=int(tokenizer.pad_token_id),
    )
    return models, tokenizer


def causal_lm_logits(model: nn.Module, input_ids: Tensor) -> Tensor:
    """Logits of a causal LM (plain or peft-wrapped) on right-padded ids, with no padding mask."""
    out = model(input_ids=input_ids, use_cache=False)
    logits: Tensor = out.logits
    return logits


def decoder_and_head(actor: nn.Module) -> tuple[LlamaModel, nn.Module]:
    """The ``LlamaModel`` and LM head inside a plain or peft-wrapped causal LM."""
    inner: Any = actor
    for _ in range(4):
        if hasattr(inner, "lm_head") and hasattr(inner, "model") and hasattr(inner.model, "layers"):
            return inner.model, inner.lm_head
        inner = inner.model if hasattr(inner, "model") else inner.base_model
    raise ValueError(f"cannot find the decoder and LM head in {type(actor).__name__}")


@dataclass(frozen=True)
class ModelSpec:
    """How to build the PPO models: a picklable recipe, so every rank builds the same weights."""

    kind: Literal["tiny", "smollm2"] = "tiny"
    tiny: dict[str, int] = field(default_factory=dict)
    """``tiny_llama_config`` keyword arguments (kind ``tiny``)."""
    seed: int = 0
    with_reward: bool = False
    """Tiny only: add the benchmark's frozen reward network (a compute stand-in)."""
    lora_layers: tuple[int, ...] = (26, 27, 28, 29)
    """SmolLM2: the layers with a LoRA. Tiny: a LoRA actor only when ``tiny_lora`` (the live
    structure in miniature: a frozen trunk below the LoRA layers)."""
    lora_rank: int = 8
    critic_layers: int = 8
    critic_trainable_layers: int = 2
    tiny_lora: bool = False

    def __post_init__(self) -> None:
        if self.kind not in ("tiny", "smollm2"):
            raise ValueError(f"kind must be 'tiny' or 'smollm2', got {self.kind!r}")
        if self.kind == "smollm2" and self.with_reward:
            raise ValueError("the live SmolLM2 build has no reward network: rewards arrive as events")

    def build(self) -> PolicyModels:
        if self.kind == "tiny" and not self.tiny_lora:
            return build_tiny_models(tiny_llama_config(**self.tiny), seed=self.seed, with_reward=self.with_reward)
        if self.kind == "tiny":
            config = tiny_llama_config(**self.tiny)
            torch.manual_seed(self.seed)
            base = LlamaForCausalLM(config)
            critic_backbone = truncated_backbone(base.model, min(self.critic_layers, config.num_hidden_layers))
            return lora_policy(base, critic_backbone, lora_layers=self.lora_layers, rank=self.lora_rank,
                               critic_trainable_layers=self.critic_trainable_layers, base_model=TINY_BASE_MODEL,
                               pad_token_id=config.pad_token_id or 0)
        torch.manual_seed(self.seed)
        models, _ = build_smollm2_models(
            lora_layers=self.lora_layers,
            rank=self.lora_rank,
            critic_layers=self.critic_layers,
            critic_trainable_layers=self.critic_trainable_layers,
        )
        return models

