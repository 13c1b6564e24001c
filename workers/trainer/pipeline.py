"""Execute a fused actor+critic pipeline schedule (``core.rlhf.pipeline``) over torch.distributed.

Each rank is one pipeline node. A Llama model is cut into ``n`` stages of consecutive decoder
layers (stage 0 adds the embedding, the last stage the final norm and the LM or value head).
A rank runs its node's ordered task list literally:

- ``F`` of model m: the next micro-batch's input arrives from the previous stage's rank (blocking
  ``recv``), the stage runs forward, the output goes to the next rank (``isend``: a send never
  blocks the sender, so only receives wait, exactly as the simulator models it). The last stage
  computes the micro-batch's PPO loss instead.
- ``B``: the output gradient arrives from the next rank (or comes from the loss), backward runs,
  the input gradient goes to the previous rank.

Frozen stages: a stage whose layers (and every earlier stage's) hold no trainable parameter has
no backward work (the live actor trains a LoRA on its last layers only, so its first stage is a
frozen trunk). Its forward runs without autograd, its ``B`` slot is an empty task, and the next
stage neither asks for nor sends the input gradient. The schedule search sees such a ``B`` as a
zero-time task.

Message tags are unique per (flush, model, micro-batch, direction), so the interleaved traffic of
two models between the same pair of ranks can never be mismatched. A schedule that passed
``core.rlhf.pipeline.validate`` cannot deadlock here: every blocking receive waits on a task the
simulation showed runs earlier. Gradients accumulate over the micro-batches of a flush; the
caller steps the optimisers after it.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from transformers import LlamaModel

from core.rlhf.pipeline import Slot


class LlamaStage(nn.Module):
    """Decoder layers ``[start, stop)`` of a Llama backbone (+ embedding on the first stage, + norm
    and ``head`` on the last). Modules are shared with the full model, not copied."""

    def __init__(self, backbone: LlamaModel, start: int, stop: int, n_layers: int, head: nn.Module | None) -> None:
        super().__init__()
        self.first = start == 0
        self.last = stop == n_layers
        self.embed = backbone.embed_tokens if self.first else None
        self.layers = nn.ModuleList(list(backbone.layers)[start:stop])
        self.norm = backbone.norm if self.last else None
        self.head = head if self.last else None
        self.rotary = backbone.rotary_emb

    def forward(self, x: Tensor) -> Tensor:
        """``x``: token ids (first stage) or hidden states; returns hidden states or head output."""
        hidden = self.embed(x) if self.embed is not None else x
        positions = torch.arange(hidden.shape[1]).unsqueeze(0)
        pos_emb = self.rotary(hidden, position_ids=positions)
        for layer in self.layers:
            hidden = layer(hidden, attention_mask=None, position_embeddings=pos_emb, position_ids=positions)
        if self.norm is not None:
            hidden = self.norm(hidden)
        if self.head is not None:
            hidden = self.head(hidden)
        return hidden


def split_points(n_layers: int, n_stages: int, cuts: Sequence[int] | None = None) -> list[tuple[int, int]]:
    """``[start, stop)`` layer ranges: at ``cuts`` (the first layer of stages 1..n-1), or balanced
    by layer count with the extra layers on earlier stages."""
    if not 1 <= n_stages <= n_layers:
        raise ValueError(f"cannot split {n_layers} layers into {n_stages} stages")
    if cuts is not None:
        bounds = [0, *cuts, n_layers]
        if len(cuts) != n_stages - 1 or any(a >= b for a, b in itertools.pairwise(bounds)):
            raise ValueError(f"cuts {list(cuts)} do not split {n_layers} layers into {n_stages} non-empty stages")
        return list(itertools.pairwise(bounds))
    base, extra = divmod(n_layers, n_stages)
    ranges, start = [], 0
    for s in range(n_stages):
        stop = start + base + (1 if s < extra else 0)
        ranges.append((start, stop))
        start = stop
    return ranges


def make_stages(
    backbone: LlamaModel, head: nn.Module, n_stages: int, cuts: Sequence[int] | None = None
) -> list[LlamaStage]:
    n_layers = len(backbone.layers)
    return [LlamaStage(backbone, a, b, n_layers, head) for a, b in split_points(n_layers, n_stages, cuts)]


def trains(stage: nn.Module) -> bool:
    return any(p.requires_grad for p in stage.parameters())


def backward_flags(stages: Sequence[nn.Module]) -> list[bool]:
    """Per stage: does it run backward (it, or a stage before it, holds trainable parameters)?"""
    flags, seen = [], False
    for stage in stages:
        seen = seen or trains(stage)
        flags.append(seen)
    return flags


@dataclass
class StageBinding:
    """What one rank runs for one model: its stage, where its neighbours live, and the loss."""

    stage: LlamaStage
    stage_index: int
    n_stages: int
    prev_rank: int | None
    next_rank: int | None
    inputs: Sequence[Tensor]
    """Per micro-batch input ids (used by the first stage and for activation shapes)."""
    hidden_size: int
    loss_fn: Callable[[Tensor, int], Tensor]
    """Last stage only: (stage output, micro-batch index) -> scalar loss share."""
    has_backward: bool = True
    """False: this stage and every earlier one are frozen (``B`` is an empty task)."""
    needs_input_grad: bool = True
    """Does the previous stage want the gradient of this stage's input (it has backward work)?"""


@dataclass
class ExecutionTrace:
    """Per-rank timing of one flush: busy compute seconds and the tasks' (start, end) times."""

    busy_s: float = 0.0
    busy_cpu_s: float = 0.0
    tasks: list[tuple[int, int, bool, float, float]] = field(default_factory=list)
    """(model, micro-batch, forward, start, end) in ``time.perf_counter`` seconds."""


@dataclass(frozen=True)
class _Tags:
    """Unique p2p message tags per (flush, model, micro-batch, direction)."""

    flush: int
    n_models: int
    max_mb: int

    def __call__(self, model: int, microbatch: int, backward: bool) -> int:
        return (((self.flush * self.n_models) + model) * self.max_mb + microbatch) * 2 + int(backward)


def run_schedule(
    order: Sequence[Slot],
    bindings: dict[int, StageBinding],
    flush: int = 0,
    trace: ExecutionTrace | None = None,
) -> None:
    """Run this rank's task list for one flush (one PPO mini-batch of every model)."""
    n_models = max(bindings) + 1 if bindings else 1
    tags = _Tags(flush, n_models, max((len(b.inputs) for b in bindings.values()), default=1))
    fwd_done = dict.fromkeys(bindings, 0)
    bwd_done = dict.fromkeys(bindings, 0)
    saved: dict[tuple[int, int], tuple[Tensor | None, Tensor]] = {}
    pending: list[tuple[Any, Tensor]] = []  # keep sent tensors alive until the send completes
    for slot in order:
        bind = bindings[slot.model]
        k = fwd_done[slot.model] if slot.forward else bwd_done[slot.model]
        ids = bind.inputs[k]
        if slot.forward:
            if bind.prev_rank is None:
                x: Tensor | None = None
                inp: Tensor = ids
            else:
                x = torch.empty(ids.shape[0], ids.shape[1], bind.hidden_size)
                dist.recv(x, src=bind.prev_rank, tag=tags(slot.model, k, False))
                x.requires_grad_(bind.needs_input_grad)
                inp = x
            start, cpu = time.perf_counter(), time.thread_time()
            with torch.set_grad_enabled(bind.has_backward):
                out = bind.stage(inp)
            if bind.next_rank is None:
                out = bind.loss_fn(out, k)
            else:
                tag = tags(slot.model, k, False)
                sent = out.detach().contiguous()
                pending.append((dist.isend(sent, dst=bind.next_rank, tag=tag), sent))
            if bind.has_backward:
                saved[(slot.model, k)] = (x, out)
            fwd_done[slot.model] += 1
        else:
            if not bind.has_backward:  # a frozen trunk: nothing to differentiate, nothing to send
                start, cpu = time.perf_counter(), time.thread_time()
            else:
                x, out = saved.pop((slot.model, k))
                if bind.next_rank is None:
                    start, cpu = time.perf_counter(), time.thread_time()
                    out.backward()
                else:
                    grad = torch.empty_like(out)
                    dist.recv(grad, src=bind.next_rank, tag=tags(slot.model, k, True))
                    start, cpu = time.perf_counter(), time.thread_time()
                    out.backward(grad)
                if bind.prev_rank is not None and bind.needs_input_grad:
                    assert x is not None and x.grad is not None
                    tag = tags(slot.model, k, True)
                    sent = x.grad.contiguous()
                    pending.append((dist.isend(sent, dst=bind.prev_rank, tag=tag), sent))
            bwd_done[slot.model] += 1
        end = time.perf_counter()
        if trace is not None:
            trace.busy_s += end - start
            trace.busy_cpu_s += time.thread_time() - cpu
            trace.tasks.append((slot.model, k, slot.forward, start, end))
    for work, _ in pending:
        work.wait()
    if saved:
        raise RuntimeError(f"flush ended with forwards never run backward: {sorted(saved)}")
