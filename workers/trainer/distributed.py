"""torch.distributed plumbing for the trainer: one code path for 1 or N processes.

``Collective`` wraps a process group. With ``world_size == 1`` (no process group) every
operation is the identity, so the single-process trainer runs the same code as the
multi-process one. Backend: NCCL when CUDA is available, else gloo (CPU).

Data parallelism is done by hand (sum-all-reduce of gradients) rather than with
``DistributedDataParallel`` because the PPO losses are normalised by the *global* token count:
summing gradients of ``local_sum / global_count`` over ranks gives exactly the single-process
gradient of the whole batch, which the tests check.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_process_group(
    rank: int,
    world_size: int,
    init_method: str | None = None,
    backend: str | None = None,
    timeout_s: float = 300.0,
) -> Collective:
    """Join (or, for ``world_size == 1``, skip) the default process group.

    ``init_method`` defaults to ``env://`` (``MASTER_ADDR``/``MASTER_PORT``); tests pass
    ``file://...`` or ``tcp://127.0.0.1:PORT``.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"invalid rank {rank} for world_size {world_size}")
    if world_size == 1:
        return Collective()
    backend = backend or default_backend()
    if init_method is None and "MASTER_ADDR" not in os.environ:
        raise ValueError("set MASTER_ADDR/MASTER_PORT or pass init_method for multi-process training")
    dist.init_process_group(
        backend=backend,
        init_method=init_method or "env://",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    return Collective(group=dist.group.WORLD)


@dataclass
class Collective:
    """Collectives over one process group (None: a single process, all no-ops)."""

    group: dist.ProcessGroup | None = None

    @property
    def world_size(self) -> int:
        return 1 if self.group is None else dist.get_world_size(self.group)

    @property
    def rank(self) -> int:
        return 0 if self.group is None else dist.get_rank(self.group)

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        """In-place sum across ranks; returns ``tensor``."""
        if self.group is not None:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
        return tensor

    def all_reduce_min(self, tensor: Tensor) -> Tensor:
        if self.group is not None:
            dist.all_reduce(tensor, op=dist.ReduceOp.MIN, group=self.group)
        return tensor

    def sum_gradients(self, params: Iterable[nn.Parameter]) -> None:
        """Sum every parameter's gradient across ranks (one flattened all-reduce)."""
        if self.group is None:
            return
        with_grad = [p for p in params if p.grad is not None]
        if not with_grad:
            return
        flat = torch.cat([p.grad.reshape(-1) for p in with_grad if p.grad is not None])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)
        offset = 0
        for p in with_grad:
            assert p.grad is not None
            n = p.grad.numel()
            p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
            offset += n

    def broadcast_module(self, module: nn.Module, src: int = 0) -> None:
        """Copy rank ``src``'s parameters and buffers into every rank's ``module``."""
        if self.group is None:
            return
        with torch.no_grad():
            for tensor in [*module.parameters(), *module.buffers()]:
                dist.broadcast(tensor.data, src=src, group=self.group)

    def barrier(self) -> None:
        if self.group is not None:
            dist.barrier(group=self.group)


def destroy() -> None:
    """Leave the default process group if one was joined."""
    if dist.is_initialized():
        dist.destroy_process_group()
