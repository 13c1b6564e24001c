"""SmolLM2-135M demo path: LoRA actor, one PPO step, a partial merged checkpoint (slow: loads the model)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from workers.trainer.batch import Rollout
from workers.trainer.checkpoint import apply_checkpoint, read_checkpoint
from workers.trainer.generation import sample_response
from workers.trainer.models import build_smollm2_models
from workers.trainer.trainer import Trainer, TrainerConfig

pytestmark = pytest.mark.model


def test_smollm2_lora_step_publishes_merged_partial_checkpoint(tmp_path: Path) -> None:
    torch.set_num_threads(2)
    models, tokenizer = build_smollm2_models(lora_layers=(29,), critic_layers=2, critic_trainable_layers=1)
    gen = torch.Generator().manual_seed(0)
    trainer = Trainer(models, TrainerConfig(store_root=tmp_path, batch_size=2, minibatch_size=2, actor_lr=1e-2))
    for i, text in enumerate(["The market closed", "The match ended"]):
        prompt = tokenizer(text)["input_ids"]
        tokens, logprobs = sample_response(models.actor, prompt, 4, gen)
        trainer.add_rollout(Rollout(f"r{i}", tuple(prompt), tuple(tokens), tuple(logprobs), "base"))
        trainer.add_reward(f"r{i}", 1.0 - 2 * i)
    result = trainer.step()
    assert result.checkpoint_dir is not None
    meta, weights = read_checkpoint(result.checkpoint_dir)
    assert meta.base_model == "smollm2-135m"
    assert set(weights) == {
        f"model.layers.29.{m}.weight"
        for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    }
    ids = torch.tensor([tokenizer("BBC News reports")["input_ids"]])
    with torch.no_grad():
        trained = models.actor(input_ids=ids).logits
    pristine = models.actor.unload()  # type: ignore[operator]  # the base with its original weights
    with torch.no_grad():
        assert not torch.allclose(pristine(input_ids=ids).logits, trained, atol=1e-3)
    apply_checkpoint(pristine, result.checkpoint_dir)  # the engine's hot-load
    with torch.no_grad():
        assert torch.allclose(pristine(input_ids=ids).logits, trained, atol=1e-3)
