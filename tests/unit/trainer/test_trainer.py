"""Trainer: event ingestion, off-policy rules, a PPO step, checkpoints and learning signal."""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from core.rlhf.buffer import OffPolicyConfig
from core.rlhf.ppo import PPOConfig
from tests.unit.trainer.factories import flat_params, make_rollouts
from workers.trainer.batch import collate, make_experience, response_logprobs
from workers.trainer.checkpoint import apply_checkpoint, read_checkpoint
from workers.trainer.models import build_tiny_models
from workers.trainer.trainer import Trainer, TrainerConfig


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def make_trainer(tmp_path: Path, **overrides: object) -> Trainer:
    models = build_tiny_models(seed=0)
    fields: dict[str, object] = dict(store_root=tmp_path / "store", batch_size=4, minibatch_size=2,
                                     actor_lr=1e-3, critic_lr=1e-3)
    fields.update(overrides)
    cfg = TrainerConfig(**fields)  # type: ignore[arg-type]
    return Trainer(models, cfg, clock=lambda: 0.0)


def test_step_publishes_a_loadable_checkpoint(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path)
    initial = copy.deepcopy(trainer.models.actor)
    for i, r in enumerate(make_rollouts(trainer.models, 4)):
        trainer.add_rollout(r)
        assert not trainer.ready()
        trainer.add_reward(r.request_id, 1.0 if i % 2 else -1.0)
    assert trainer.ready()
    result = trainer.step()
    assert (result.version, result.step) == ("v1", 1)
    assert result.checkpoint_dir is not None and result.checkpoint_dir.name == result.digest
    meta = json.loads((result.checkpoint_dir / "checkpoint.json").read_text())
    assert meta == {"base_model": "tiny-llama", "version": "v1", "step": 1}
    _, weights = read_checkpoint(result.checkpoint_dir)
    assert set(weights) == set(trainer.models.actor.state_dict())
    assert "model.layers.0.mlp.down_proj.weight" in weights
    assert not torch.equal(flat_params(initial), flat_params(trainer.models.actor))
    # Hot-loading the checkpoint into the initial weights reproduces the trained actor.
    apply_checkpoint(initial, result.checkpoint_dir)
    assert torch.equal(flat_params(initial), flat_params(trainer.models.actor))
    for key in ("policy_loss", "value_loss", "clipfrac", "approx_kl", "kl_mean", "score_mean"):
        assert key in result.metrics
    assert not trainer.ready()


def test_reward_may_arrive_before_its_rollout(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path)
    rollouts = make_rollouts(trainer.models, 4)
    for r in rollouts:
        trainer.add_reward(r.request_id, 0.5)
    for r in rollouts:
        trainer.add_rollout(r)
    assert trainer.ready() and not trainer.buffer.pending


def test_expired_rollouts_are_dropped_and_counted_never_scored(tmp_path: Path) -> None:
    now = [0.0]
    models = build_tiny_models(seed=0)
    cfg = TrainerConfig(store_root=tmp_path, batch_size=2, minibatch_size=2,
                        off_policy=OffPolicyConfig(reward_timeout_s=10.0))
    trainer = Trainer(models, cfg, clock=lambda: now[0])
    rollouts = make_rollouts(models, 4)
    for r in rollouts:
        trainer.add_rollout(r)
    trainer.add_reward(rollouts[0].request_id, 2.0)
    now[0] = 5.0
    assert trainer.expire() == []
    now[0] = 10.0
    assert trainer.expire() == [r.request_id for r in rollouts[1:]]
    assert trainer.counters["expired_unrewarded"] == 3
    assert not trainer.ready()  # one rewarded rollout; nothing was scored in place of a reward
    trainer.add_reward(rollouts[1].request_id, 1.0)  # too late: its rollout is gone
    assert not trainer.ready() and rollouts[1].request_id in trainer.buffer.early_rewards


def test_experience_uses_the_behaviour_logprobs_as_old_logprobs(tmp_path: Path) -> None:
    models = build_tiny_models(seed=0)
    rollouts = make_rollouts(models, 2)
    shifted = [replace(r, response_logprobs=tuple(x - 0.3 for x in r.response_logprobs)) for r in rollouts]
    batch = collate(shifted, models.pad_token_id)
    exp = make_experience(models, batch, torch.tensor([1.0, -1.0]), PPOConfig())
    assert torch.equal(exp.old_logprobs, batch.behaviour_logprobs)
    with torch.no_grad():
        current = response_logprobs(models.actor, batch)
    gap = ((current - exp.old_logprobs) * batch.response_mask).sum() / batch.response_mask.sum()
    assert float(gap) == pytest.approx(0.3, abs=1e-4)  # the ratio sees how far behaviour and policy differ


def test_adapter_served_rollouts_are_excluded_unless_corrected(tmp_path: Path) -> None:
    served = replace(make_rollouts(build_tiny_models(seed=0), 1)[0], adapter_version="abc")
    excluding = make_trainer(tmp_path)
    assert not excluding.add_rollout(served)
    assert excluding.counters["adapter_excluded"] == 1
    correcting = make_trainer(tmp_path, off_policy=OffPolicyConfig(adapter_rollouts="correct"))
    assert correcting.add_rollout(served)


def test_rollouts_that_age_past_the_staleness_bound_while_waiting_are_dropped(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, batch_size=2, minibatch_size=2, off_policy=OffPolicyConfig(max_staleness=1))
    old = make_rollouts(trainer.models, 2, version="base", prefix="old")
    for r in old:
        trainer.add_rollout(r)
        trainer.add_reward(r.request_id, 1.0)
    trainer.step()  # v1: base is one version old, still fresh
    waiting = make_rollouts(trainer.models, 2, version="base", prefix="w")
    for r in waiting:
        assert trainer.add_rollout(r)
    trainer.buffer.published("v2")  # now base is two versions old
    for r in waiting:
        trainer.add_reward(r.request_id, 1.0)
    assert not trainer.ready()
    assert trainer.counters["stale_dropped"] == 2


def test_stale_and_duplicate_rollouts_are_dropped(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, off_policy=OffPolicyConfig(max_staleness=0))
    fresh, stale = (
        make_rollouts(trainer.models, 2, version="base")[0],
        make_rollouts(trainer.models, 1, version="v0-old", prefix="s")[0],
    )
    assert trainer.add_rollout(fresh)
    assert not trainer.add_rollout(fresh)
    assert not trainer.add_rollout(stale)
    assert trainer.counters["stale_dropped"] == 1 and trainer.counters["duplicates"] == 1


def test_ppo_steps_move_probability_towards_rewarded_responses(tmp_path: Path) -> None:
    """Reward +1 when a response starts with an even token, -1 otherwise: P(even first) must rise."""
    models = build_tiny_models(seed=1)
    cfg = TrainerConfig(
        store_root=tmp_path, batch_size=8, minibatch_size=8, ppo_epochs=2, actor_lr=1e-2, critic_lr=1e-2
    )
    trainer = Trainer(models, cfg)
    prompt = [5, 17, 42, 9]
    probe = torch.tensor([prompt])

    def p_even() -> float:
        with torch.no_grad():
            logits = models.actor(input_ids=probe).logits[0, -1]
        return float(torch.softmax(logits, -1)[0::2].sum())

    before = p_even()
    for gen_seed in range(6):
        rollouts = make_rollouts(models, 8, seed=gen_seed, prefix=f"g{gen_seed}-", prompt=prompt, max_new=3,
                                  version=trainer.version)
        for r in rollouts:
            trainer.add_rollout(r)
            trainer.add_reward(r.request_id, 1.0 if r.response_token_ids[0] % 2 == 0 else -1.0)
        trainer.step()
    assert p_even() > before + 0.1


def test_step_without_a_full_batch_is_an_error(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path)
    with pytest.raises(ValueError, match="needs 4"):
        trainer.step()


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="divide"):
        TrainerConfig(store_root=Path("x"), batch_size=6, minibatch_size=4)


def test_response_logprobs_match_sampling_logprobs(tmp_path: Path) -> None:
    models = build_tiny_models(seed=0)
    rollouts = make_rollouts(models, 3)
    batch = collate(rollouts, models.pad_token_id)
    with torch.no_grad():
        logp = response_logprobs(models.actor, batch)
    assert torch.allclose(logp * batch.response_mask, batch.behaviour_logprobs, atol=1e-5)
