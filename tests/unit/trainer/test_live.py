"""The live trainer's iteration on 2 gloo ranks (tiny LoRA models, byte tokenizer): rewarded
rollouts train, live prompts are answered, a resumed trainer continues from the exact policy."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from core.rlhf.buffer import OffPolicyConfig
from tests.unit.personalization.tiny import ByteTokenizer
from tests.unit.trainer.factories import make_rollouts
from workers.trainer.checkpoint import apply_checkpoint, read_checkpoint
from workers.trainer.live import LiveConfig, LiveTrainer, rollouts_of
from workers.trainer.models import ModelSpec

SPEC = ModelSpec(kind="tiny", tiny={"vocab_size": 260, "hidden_size": 32, "num_layers": 4, "num_heads": 2,
                                    "num_kv_heads": 1, "intermediate_size": 64},
                 seed=0, tiny_lora=True, lora_layers=(2, 3), lora_rank=4, critic_layers=4, critic_trainable_layers=1)


def config(tmp_path: Path, **overrides: object) -> LiveConfig:
    fields: dict[str, object] = dict(store_root=tmp_path / "ckpt", batch_size=4, microbatches=2, generate=2,
                                     max_new_tokens=6, anneal_iterations=200, actor_lr=1e-2, critic_lr=1e-2,
                                     off_policy=OffPolicyConfig(max_staleness=2, reward_timeout_s=60))
    fields.update(overrides)
    return LiveConfig(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize("fused", [True, False])
def test_an_iteration_trains_the_rewarded_batch_and_answers_live_prompts(tmp_path: Path, fused: bool) -> None:
    torch.set_num_threads(1)
    trainer = LiveTrainer.start(config(tmp_path, fused=fused), SPEC, tokenizer=ByteTokenizer(), start_method="fork")
    try:
        for i, text in enumerate(["What is 2+3?", "Name a fruit.", "Say hi."]):
            trainer.add_prompt(f"req-{i}", "t", f"user-{i}", text)
        rollouts = make_rollouts(SPEC.build(), 5, version="base")
        for r in rollouts[:4]:
            assert trainer.buffer.add(r, now=0.0)
            trainer.buffer.add_reward(r.request_id, 1.0 if r.response_token_ids[0] % 2 else -1.0)
        trainer.buffer.add(rollouts[4], now=0.0)  # never rewarded: it must not train
        assert trainer.ready(now=1.0)
        step = trainer.iterate(now=1.0)
        assert (step.version, step.parent_version, step.step) == ("v1", "base", 1)
        assert set(step.trained) == {r.request_id for r in rollouts[:4]}
        assert step.metrics["response_tokens"] > 0 and "approx_kl" in step.metrics
        meta, weights = read_checkpoint(step.checkpoint_dir)
        assert meta.version == "v1" and weights  # merged engine weights
        assert len(step.generated) == 2
        for g in step.generated:
            assert g.model_version == "base" and 1 <= len(g.tokens) <= 6 and g.request_id.startswith("trainer-")
            assert g.request_id in trainer.ref_cache  # reference log-probs computed during generation
        # The generated samples come back from the topic and train once rewarded (next iteration).
        for r in rollouts_of(step):
            assert trainer.buffer.add(r, now=2.0)
            trainer.buffer.add_reward(r.request_id, 0.5)
        assert not trainer.ready(now=2.0)  # 2 of 4
        assert trainer.buffer.expire(now=61.0) == [rollouts[4].request_id]
        assert trainer.buffer.counters["expired_unrewarded"] == 1
    finally:
        trainer.close()


def test_a_resumed_trainer_continues_from_the_published_policy(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    first = LiveTrainer.start(config(tmp_path, generate=0), SPEC, tokenizer=ByteTokenizer(), start_method="fork")
    try:
        for r in make_rollouts(SPEC.build(), 4):
            first.buffer.add(r, now=0.0)
            first.buffer.add_reward(r.request_id, 1.0)
        step = first.iterate(now=0.0)
        trained = first.cluster.digests()[0]
    finally:
        first.close()
    second = LiveTrainer.start(config(tmp_path, generate=0), SPEC, tokenizer=ByteTokenizer(), start_method="fork")
    try:
        assert second.cluster.digests()[0] != trained
        second.resume(step.checkpoint_dir, step.step)
        assert second.cluster.digests() == [trained, trained]
        assert second.version == "v1" and second.buffer.is_fresh("base")
    finally:
        second.close()
    # What workers hot-load: the merged weights reproduce the trained actor on the pristine base.
    engine_model = SPEC.build().actor.unload()  # type: ignore[operator]
    apply_checkpoint(engine_model, step.checkpoint_dir)
