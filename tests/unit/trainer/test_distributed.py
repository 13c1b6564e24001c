"""Data-parallel training over 2 gloo processes stays in sync and equals one process on the union."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
import torch.multiprocessing as mp

from tests.unit.trainer.factories import flat_params, make_rollouts
from workers.trainer.distributed import destroy, init_process_group
from workers.trainer.models import build_tiny_models
from workers.trainer.trainer import Trainer, TrainerConfig

REWARDS = [1.0, -0.5, 0.25, -1.0]


def use_sgd(trainer: Trainer) -> None:
    """Plain SGD makes the update proportional to the gradient, so comparing weights compares
    gradients (Adam's first step is ~lr * sign(g) and turns float noise in ~0 gradients into
    full-size differences)."""
    trainer.actor_opt = torch.optim.SGD(trainer.models.actor_parameters(), lr=0.5)
    trainer.critic_opt = torch.optim.SGD(trainer.models.critic_parameters(), lr=0.5)


def _rank_main(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    collective = init_process_group(rank, world, init_method=f"file://{init_file}", backend="gloo")
    try:
        # Rank 1 starts from different random weights: the trainer must broadcast rank 0's.
        models = build_tiny_models(seed=rank)
        reference = build_tiny_models(seed=0)
        rollouts = make_rollouts(reference, 4)
        cfg = TrainerConfig(
            store_root=Path(out_dir) / "store", batch_size=2, minibatch_size=2, actor_lr=1e-3, critic_lr=1e-3
        )
        trainer = Trainer(models, cfg, collective=collective)
        use_sgd(trainer)
        mine = range(rank * 2, rank * 2 + 2)
        for i in mine:
            trainer.add_rollout(rollouts[i])
            trainer.add_reward(rollouts[i].request_id, REWARDS[i])
        assert trainer.ready()
        result = trainer.step()
        assert (result.checkpoint_dir is not None) == (rank == 0)
        torch.save(
            {
                "actor": flat_params(models.actor),
                "critic": flat_params(models.critic),
                "metrics": result.metrics,
            },
            Path(out_dir) / f"rank{rank}.pt",
        )
    finally:
        destroy()


def test_two_gloo_ranks_match_each_other_and_a_single_process() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        init_file = str(Path(tmp) / "init")
        # fork: the children inherit the imported modules (spawn re-imports torch + transformers).
        mp.start_processes(_rank_main, args=(2, init_file, tmp), nprocs=2, join=True, start_method="fork")
        r0 = torch.load(Path(tmp) / "rank0.pt")
        r1 = torch.load(Path(tmp) / "rank1.pt")

        torch.set_num_threads(1)
        models = build_tiny_models(seed=0)
        rollouts = make_rollouts(models, 4)
        cfg = TrainerConfig(
            store_root=Path(tmp) / "single", batch_size=4, minibatch_size=4, actor_lr=1e-3, critic_lr=1e-3
        )
        trainer = Trainer(models, cfg)
        use_sgd(trainer)
        for r, reward in zip(rollouts, REWARDS, strict=True):
            trainer.add_rollout(r)
            trainer.add_reward(r.request_id, reward)
        single = trainer.step()

    assert torch.equal(r0["actor"], r1["actor"])  # the ranks apply the same reduced gradient
    assert torch.equal(r0["critic"], r1["critic"])
    initial = flat_params(build_tiny_models(seed=0).actor)
    moved = (r0["actor"] - initial).abs()
    assert float(moved.max()) > 1e-3  # training did something
    assert torch.allclose(r0["actor"], flat_params(models.actor), atol=1e-6)
    assert torch.allclose(r0["critic"], flat_params(models.critic), atol=1e-6)
    assert abs(r0["metrics"]["policy_loss"] - single.metrics["policy_loss"]) < 1e-5
