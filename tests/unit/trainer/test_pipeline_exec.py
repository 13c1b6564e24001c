"""Executing pipeline schedules over 2 gloo ranks gives the single-process gradients."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import cast

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor
from transformers import LlamaForCausalLM

from core.rlhf.anneal import AnnealConfig, anneal_schedule
from core.rlhf.pipeline import PipelineModel, PipelineProblem, Schedule, sequential_schedule
from workers.trainer.models import build_tiny_models, tiny_llama_config
from workers.trainer.pipeline import StageBinding, make_stages, run_schedule, split_points

N_MICRO = 3
CONFIG = {"num_layers": 4, "hidden_size": 32, "intermediate_size": 64, "vocab_size": 64}


def microbatches() -> list[Tensor]:
    gen = torch.Generator().manual_seed(3)
    return [torch.randint(3, 60, (2, 5 + k), generator=gen) for k in range(N_MICRO)]


def loss_of(out: Tensor, k: int) -> Tensor:
    return (out.float() ** 2).mean() * (k + 1)


def schedules() -> tuple[Schedule, Schedule]:
    model = PipelineModel("m", N_MICRO, (1, 1), (2, 2), (0, 1), (1.0, 1.0))
    critic = PipelineModel("c", N_MICRO, (1, 1), (2, 2), (1, 0), (1.0, 1.0))
    problem = PipelineProblem((model, critic), 2)
    fused = anneal_schedule(problem, AnnealConfig(iterations=500, memory_iterations=0, restarts=1)).schedule
    return sequential_schedule(problem), fused


def _rank_main(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        models = build_tiny_models(tiny_llama_config(**CONFIG), seed=0)
        actor = cast(LlamaForCausalLM, models.actor)
        actor_stages = make_stages(actor.model, actor.lm_head, 2)
        critic_stages = make_stages(models.critic.backbone, models.critic.value_head, 2)
        inputs = microbatches()
        bindings = {
            0: StageBinding(
                actor_stages[rank], rank, 2, None if rank == 0 else 0, 1 if rank == 0 else None, inputs, 32, loss_of
            ),
            1: StageBinding(
                critic_stages[1 - rank],
                1 - rank,
                2,
                None if rank == 1 else 1,
                0 if rank == 1 else None,
                inputs,
                32,
                loss_of,
            ),
        }
        for name, schedule in zip(("sequential", "fused"), schedules(), strict=True):
            for module in (actor, models.critic):
                module.zero_grad(set_to_none=True)
            run_schedule(schedule.orders[rank], bindings, flush=0 if name == "sequential" else 1)
            grads = {f"actor.{n}": p.grad.clone() for n, p in actor.named_parameters() if p.grad is not None}
            grads.update(
                {f"critic.{n}": p.grad.clone() for n, p in models.critic.named_parameters() if p.grad is not None}
            )
            torch.save(grads, Path(out_dir) / f"{name}{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_split_points_balance_layers() -> None:
    assert split_points(5, 2) == [(0, 3), (3, 5)]
    assert split_points(4, 4) == [(0, 1), (1, 2), (2, 3), (3, 4)]


def test_stage_split_forward_equals_the_full_model() -> None:
    models = build_tiny_models(tiny_llama_config(**CONFIG), seed=0)
    actor = cast(LlamaForCausalLM, models.actor)
    ids = microbatches()[0]
    hidden = ids
    for stage in make_stages(actor.model, actor.lm_head, 2):
        hidden = stage(hidden)
    with torch.no_grad():
        assert torch.allclose(hidden, actor(input_ids=ids).logits, atol=1e-5)


def test_sequential_and_fused_schedules_give_single_process_gradients() -> None:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_rank_main, args=(str(Path(tmp) / "init"), tmp), nprocs=2, join=True, start_method="fork")
        results = {
            name: {**torch.load(Path(tmp) / f"{name}0.pt"), **torch.load(Path(tmp) / f"{name}1.pt")}
            for name in ("sequential", "fused")
        }
    models = build_tiny_models(tiny_llama_config(**CONFIG), seed=0)
    actor = cast(LlamaForCausalLM, models.actor)
    for k, ids in enumerate(microbatches()):
        loss_of(actor(input_ids=ids).logits, k).backward()
        loss_of(models.critic(ids).unsqueeze(-1), k).backward()
    expected = {f"actor.{n}": p.grad for n, p in actor.named_parameters() if p.grad is not None}
    expected.update({f"critic.{n}": p.grad for n, p in models.critic.named_parameters() if p.grad is not None})
    for name, grads in results.items():
        assert set(grads) == set(expected), name
        for key, grad in expected.items():
            assert torch.allclose(grads[key], grad, atol=1e-5, rtol=1e-4), (name, key)
