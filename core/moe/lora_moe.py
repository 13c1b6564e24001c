"""Mixture of LoRA experts on a frozen Llama MLP, with a learned top-k token router (CoMiGS).

Expert ``e`` is the frozen MLP with a LoRA on each of its three projections:

    MLP_e(x) = (down + dD_e)( act((gate + dG_e)(x)) * (up + dU_e)(x) ),   dW = scaling * B @ A

and the layer output is ``sum_{e in topk(x)} w_e(x) * MLP_e(x)`` where the router is
``Linear(hidden, E, bias=False)`` and ``w`` is the softmax over the chosen logits (as in CoMiGS's
``per_token_router``). Experts ``0 .. n_generalists-1`` are *generalists* (averaged across users
each round); the rest are the user's *specialists* (never shared). A user may hold any number of
specialists, so stronger devices keep more.

Efficiency without changing the maths: ``gate(x)`` and ``up(x)`` of the frozen base are computed
once per token and shared by all experts (only the low-rank deltas differ); each expert then runs
``down`` only on the tokens routed to it. The frozen base MLP is held by reference, not
registered, so a layer's ``state_dict`` holds only LoRA and router tensors.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class MoELoRAConfig:
    """Shape of one user's mixture."""

    n_generalists: int = 1
    """Experts averaged across users each round."""
    n_specialists: int = 1
    """Experts that stay on the user's device."""
    rank: int = 8
    alpha: float = 16.0
    """LoRA scale is ``alpha / rank``."""
    top_k: int = 2
    generalist_share: float = 0.5
    """Target share of routing slots for the generalists, used by the balancing loss."""

    def __post_init__(self) -> None:
        if self.n_generalists < 0 or self.n_specialists < 0 or self.n_experts < 1:
            raise ValueError(
                f"need >= 1 expert, got {self.n_generalists} generalists and {self.n_specialists} specialists"
            )
        if self.rank < 1 or self.top_k < 1:
            raise ValueError(f"rank and top_k must be >= 1, got {self.rank} and {self.top_k}")
        if not 0.0 < self.generalist_share < 1.0:
            raise ValueError(f"generalist_share must be in (0, 1), got {self.generalist_share}")

    @property
    def n_experts(self) -> int:
        return self.n_generalists + self.n_specialists

    def target_shares(self) -> list[float]:
        """Routing share each expert should get: the generalist share split among generalists."""
        if self.n_generalists == 0 or self.n_specialists == 0:
            return [1.0 / self.n_experts] * self.n_experts
        g = self.generalist_share / self.n_generalists
        s = (1.0 - self.generalist_share) / self.n_specialists
        return [g] * self.n_generalists + [s] * self.n_specialists


class LoRADelta(nn.Module):
    """``scaling * B @ A`` applied to inputs; B starts at zero so a new expert equals the base."""

    def __init__(self, in_features: int, out_features: int, rank: int, scaling: float) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.empty(rank, in_features))
        self.B = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.scaling = scaling

    def forward(self, x: Tensor) -> Tensor:
        return (x @ self.A.t() @ self.B.t()) * self.scaling

    def delta_weight(self) -> Tensor:
        return (self.B @ self.A) * self.scaling


class LoRAExpert(nn.Module):
    """LoRA deltas for the gate, up and down projections of one Llama MLP."""

    gate: LoRADelta
    up: LoRADelta
    down: LoRADelta

    def __init__(self, hidden: int, intermediate: int, rank: int, scaling: float) -> None:
        super().__init__()
        self.gate = LoRADelta(hidden, intermediate, rank, scaling)
        self.up = LoRADelta(hidden, intermediate, rank, scaling)
        self.down = LoRADelta(intermediate, hidden, rank, scaling)


class MoELoRAMLP(nn.Module):
    """A drop-in replacement for a frozen ``LlamaMLP``: a mixture of LoRA experts over it."""

    _targets: Tensor

    def __init__(self, base_mlp: Any, cfg: MoELoRAConfig) -> None:
        super().__init__()
        self._base: tuple[Any] = (base_mlp,)  # a tuple hides it from nn.Module registration (shared, frozen)
        hidden = base_mlp.gate_proj.in_features
        intermediate = base_mlp.gate_proj.out_features
        self.cfg = cfg
        scaling = cfg.alpha / cfg.rank
        self.experts = nn.ModuleList(LoRAExpert(hidden, intermediate, cfg.rank, scaling) for _ in range(cfg.n_experts))
        self.router = nn.Linear(hidden, cfg.n_experts, bias=False) if cfg.n_experts > 1 else None
        self.top_k = min(cfg.top_k, cfg.n_experts)
        self.register_buffer("_targets", torch.tensor(cfg.target_shares()), persistent=False)
        self.last_balance_loss: Tensor = torch.zeros(())
        self.last_generalist_share: float = 1.0 if cfg.n_specialists == 0 else 0.0

    @property
    def base(self) -> Any:
        """The frozen ``LlamaMLP`` (``gate_proj``, ``up_proj``, ``down_proj``, ``act_fn``)."""
        return self._base[0]

    def expert(self, e: int) -> LoRAExpert:
        return cast(LoRAExpert, self.experts[e])

    def expert_forward(self, e: int, x: Tensor, gate: Tensor, up: Tensor) -> Tensor:
        """MLP_e on tokens ``x`` whose frozen ``gate(x)``/``up(x)`` are precomputed."""
        expert = self.expert(e)
        h = self.base.act_fn(gate + expert.gate(x)) * (up + expert.up(x))
        out: Tensor = self.base.down_proj(h) + expert.down(h)
        return out

    def routing(self, flat: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(top-k expert ids, their weights, full router probabilities) per token."""
        assert self.router is not None
        logits = self.router(flat)
        top_logits, top_ids = torch.topk(logits, self.top_k, dim=-1)
        return top_ids, torch.softmax(top_logits, dim=-1), torch.softmax(logits, dim=-1)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        gate = self.base.gate_proj(flat)
        up = self.base.up_proj(flat)
        if self.router is None:
            return self.expert_forward(0, flat, gate, up).reshape(shape)
        top_ids, weights, probs = self.routing(flat)
        out = torch.zeros_like(flat)
        for e in range(self.cfg.n_experts):
            rows, slot = torch.where(top_ids == e)
            if rows.numel() == 0:
                continue
            y = self.expert_forward(e, flat[rows], gate[rows], up[rows])
            # Accumulate in the input dtype (under bf16 autocast the experts emit bf16).
            out = out.index_add(0, rows, (weights[rows, slot].unsqueeze(-1) * y).to(out.dtype))
        self.last_balance_loss = balance_loss(top_ids, probs, self._targets)
        with torch.no_grad():  # router weight mass on the generalists, averaged over tokens
            g = self.cfg.n_generalists
            self.last_generalist_share = float((weights * (top_ids < g)).sum(-1).mean()) if g else 0.0
        return out.reshape(shape)

    def dense_reference(self, x: Tensor) -> Tensor:
        """Slow reference: every expert as a plain MLP with merged weights, weighted densely."""
        flat = x.reshape(-1, x.shape[-1])
        base = self.base
        outputs = []
        for e in range(self.cfg.n_experts):
            expert = self.expert(e)
            gate_w = base.gate_proj.weight + expert.gate.delta_weight()
            up_w = base.up_proj.weight + expert.up.delta_weight()
            down_w = base.down_proj.weight + expert.down.delta_weight()
            h = base.act_fn(flat @ gate_w.t()) * (flat @ up_w.t())
            outputs.append(h @ down_w.t())
        stacked = torch.stack(outputs, dim=1)  # (tokens, E, hidden)
        if self.router is None:
            return stacked[:, 0].reshape(x.shape)
        top_ids, weights, _ = self.routing(flat)
        dense = torch.zeros(flat.shape[0], self.cfg.n_experts, dtype=flat.dtype)
        dense.scatter_(1, top_ids, weights)
        return (dense.unsqueeze(-1) * stacked).sum(dim=1).reshape(x.shape)

    # ----------------------------------------------------------- parameter groups

    def generalist_parameters(self) -> Iterator[nn.Parameter]:
        for e in range(self.cfg.n_generalists):
            yield from self.experts[e].parameters()

    def specialist_parameters(self) -> Iterator[nn.Parameter]:
        for e in range(self.cfg.n_generalists, self.cfg.n_experts):
            yield from self.experts[e].parameters()

    def router_parameters(self) -> Iterator[nn.Parameter]:
        if self.router is not None:
            yield from self.router.parameters()

    def generalist_state(self) -> dict[str, Tensor]:
        """Generalist tensors by name (what a client uploads each round)."""
        return {
            name: p.detach().clone()
            for name, p in self.named_parameters()
            if name.startswith("experts.") and int(name.split(".")[1]) < self.cfg.n_generalists
        }


def balance_loss(top_ids: Tensor, probs: Tensor, targets: Tensor) -> Tensor:
    """Switch-style balancing towards target shares: ``sum_e f_e * P_e / t_e``.

    ``f_e`` is the share of top-k routing slots expert ``e`` got (no gradient), ``P_e`` the mean
    router probability of ``e`` (carries the gradient), ``t_e`` the target share. With uniform
    targets this is ``E * sum f P``, the Switch Transformer loss; its minimum over routings
    that match the targets is 1. CoMiGS weights the generalist with ``expert0_importance`` the
    same way.
    """
    n_experts = probs.shape[-1]
    slots = torch.nn.functional.one_hot(top_ids, n_experts).float().sum(dim=1)  # (tokens, E)
    f = slots.mean(dim=0) / top_ids.shape[-1]
    p = probs.mean(dim=0)
    return (f.detach() * p / targets).sum()


def average_states(states: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Uniform average (weight 1/N, as CoMiGS's ``DefaultAggregationStrategy``) of same-keyed states."""
    if not states:
        raise ValueError("nothing to average")
    keys = set(states[0])
    for s in states[1:]:
        if set(s) != keys:
            raise ValueError(f"states disagree on tensors: {sorted(keys ^ set(s))[:4]}")
    return {k: torch.stack([s[k] for s in states]).mean(dim=0) for k in keys}


@torch.no_grad()
def load_generalists(layers: Iterable[MoELoRAMLP], states: Sequence[dict[str, Tensor]]) -> None:
    """Copy per-layer generalist tensors into the layers (names as from ``generalist_state``)."""
    for layer, state in zip(layers, states, strict=True):
        params = dict(layer.named_parameters())
        for name, tensor in state.items():
            params[name].copy_(tensor)
