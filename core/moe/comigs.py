"""CoMiGS: collaborative mixtures of generalist and specialist LoRA experts across users.

Each user (``Client``) holds a ``MoELoRAMLP`` on each adapted MLP of a shared frozen model
(``TailLM``). Per round:

1. the server averages every client's *generalist* experts uniformly and each client copies
   the average in (``aggregate``); specialists and routers never leave the client;
2. each client runs ``local_steps`` *expert* updates on its training split (the lower level of
   the bi-level problem: experts minimise training loss given the router), and every
   ``router_every`` expert steps, ``router_steps`` *router* updates on its validation split (the
   upper level: routing minimises validation loss). Experts and router have separate AdamW
   optimisers (cosine schedule for experts, constant for the router), as in CoMiGS's code.

A final aggregation follows the last round, so every user ends with the common generalists.
The same client runs the baselines: *local* (one specialist, no sharing) and *FedAvg* (one
generalist shared by all, no router). Users may hold different numbers of specialists.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from core.moe.lora_moe import MoELoRAConfig, MoELoRAMLP, average_states, load_generalists
from core.moe.tail import TailLM


@dataclass(frozen=True)
class CoMiGSConfig:
    """Training budget and optimisation of one federated run."""

    rounds: int = 10
    local_steps: int = 5
    """Expert updates per client per round (the shared compute budget across arms)."""
    batch_size: int = 4
    expert_lr: float = 1e-3
    router_lr: float = 1e-3
    router_every: int = 5
    """Expert steps between router phases (CoMiGS uses 30 with 10 router steps)."""
    router_steps: int = 2
    """Router updates per phase."""
    router_on_train: bool = False
    """Ablation: update the router jointly on training batches instead of validation batches."""
    balance_weight: float = 0.01
    """Weight of the routing balance loss (CoMiGS: 0.01)."""
    share_generalists: bool = True
    """False: no communication at all (the local baseline)."""
    bf16_autocast: bool = False
    """Run training steps under CPU bf16 autocast (AMX/AVX512-BF16 matmuls); evaluation stays fp32."""
    validation_steps_without_router: bool = False
    """Baselines matched to CoMiGS in passes and data: a client with no router spends each router
    phase on expert updates on its *validation* split instead (same passes, same data seen)."""
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.rounds, self.local_steps, self.batch_size, self.router_every) < 1:
            raise ValueError(
                f"rounds, local_steps, batch_size, router_every must be >= 1, got {self.rounds}, "
                f"{self.local_steps}, {self.batch_size}, {self.router_every}"
            )
        if self.router_steps < 0:
            raise ValueError(f"router_steps must be >= 0, got {self.router_steps}")


@dataclass
class Split:
    """Cached hidden states entering the adapted layers, and the token ids they came from."""

    hidden: Tensor
    """(chunks, seq, hidden)."""
    ids: Tensor
    """(chunks, seq)."""

    def __len__(self) -> int:
        return int(self.ids.shape[0])


@dataclass
class UserData:
    train: Split
    val: Split
    test: Split


class Client:
    """One user's mixture layers, optimisers and data."""

    def __init__(
        self, name: str, tail: TailLM, data: UserData, moe: MoELoRAConfig, cfg: CoMiGSConfig, seed: int
    ) -> None:
        if len(data.train) == 0 or len(data.val) == 0:
            raise ValueError(f"user {name!r} needs training and validation chunks")
        self.name, self.tail, self.data, self.moe, self.cfg = name, tail, data, moe, cfg
        torch.manual_seed(seed)
        self.layers = [MoELoRAMLP(mlp, moe) for mlp in tail.base_mlps()]
        self.gen = torch.Generator().manual_seed(seed)
        expert_params = [p for layer in self.layers for p in layer.experts.parameters()]
        self.router_params = [p for layer in self.layers for p in layer.router_parameters()]
        total = cfg.rounds * cfg.local_steps
        if cfg.validation_steps_without_router and not self.router_params:
            total += cfg.rounds * (cfg.local_steps // cfg.router_every) * cfg.router_steps
        self.expert_opt = torch.optim.AdamW(expert_params, lr=cfg.expert_lr)
        self.expert_sched = torch.optim.lr_scheduler.LambdaLR(
            self.expert_opt, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
        )
        self.router_opt = torch.optim.AdamW(self.router_params, lr=cfg.router_lr) if self.router_params else None
        self.steps = 0
        self.router_updates = 0
        self.forward_backward = 0
        """Forward+backward passes run (experts and router), for the compute report."""

    def n_parameters(self) -> int:
        """Trainable parameters of this user's mixture (experts and routers)."""
        return sum(p.numel() for layer in self.layers for p in layer.parameters())

    # ------------------------------------------------------------------ training

    def _batch(self, split: Split) -> tuple[Tensor, Tensor]:
        idx = torch.randint(0, len(split), (min(self.cfg.batch_size, len(split)),), generator=self.gen)
        return split.hidden[idx], split.ids[idx]

    def _loss(self, hidden: Tensor, ids: Tensor) -> Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.cfg.bf16_autocast):
            loss = self.tail.loss(hidden, ids, self.layers)
        if self.router_params and self.cfg.balance_weight:
            balance = torch.stack([layer.last_balance_loss.float() for layer in self.layers]).mean()
            loss = loss.float() + self.cfg.balance_weight * balance
        return loss

    def _zero(self) -> None:
        self.expert_opt.zero_grad(set_to_none=True)
        if self.router_opt is not None:
            self.router_opt.zero_grad(set_to_none=True)

    def expert_step(self, split: Split | None = None) -> float:
        """One lower-level update: experts (and, in the ablation, the router) on a train batch."""
        self._zero()
        loss = self._loss(*self._batch(self.data.train if split is None else split))
        loss.backward()
        self.expert_opt.step()
        self.expert_sched.step()
        if self.router_opt is not None and self.cfg.router_on_train:
            self.router_opt.step()
        self.steps += 1
        self.forward_backward += 1
        return float(loss.detach())

    def router_step(self) -> float:
        """One upper-level update: the router on a validation batch, experts fixed."""
        assert self.router_opt is not None
        self._zero()
        loss = self._loss(*self._batch(self.data.val))
        loss.backward()
        self.router_opt.step()
        self.router_updates += 1
        self.forward_backward += 1
        return float(loss.detach())

    def local_round(self) -> float:
        """``local_steps`` expert updates with router phases interleaved; returns mean train loss."""
        losses = []
        matched = self.router_opt is None and self.cfg.validation_steps_without_router
        for _ in range(self.cfg.local_steps):
            losses.append(self.expert_step())
            bilevel = self.router_opt is not None and not self.cfg.router_on_train
            phase = self.steps % self.cfg.router_every == 0
            if bilevel and phase:
                for _ in range(self.cfg.router_steps):
                    self.router_step()
            elif matched and phase:  # the baseline's share of the router passes, on the same data
                for _ in range(self.cfg.router_steps):
                    self.expert_step(self.data.val)
                    self.steps -= 1  # router-phase passes do not advance the phase counter
        return sum(losses) / len(losses)

    # ------------------------------------------------------------------ communication

    def generalist_states(self) -> list[dict[str, Tensor]]:
        return [layer.generalist_state() for layer in self.layers]

    def load_generalists(self, states: Sequence[dict[str, Tensor]]) -> None:
        load_generalists(self.layers, states)

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def perplexity(self, split: Split, batch_size: int = 8) -> tuple[float, float]:
        """(exact perplexity over every predicted token of ``split``, generalist routing share)."""
        total, count, share = 0.0, 0, 0.0
        for start in range(0, len(split), batch_size):
            hidden = split.hidden[start : start + batch_size]
            ids = split.ids[start : start + batch_size]
            nll = self.tail.token_nll(hidden, ids, self.layers)
            total += float(nll.sum())
            count += nll.numel()
            share += sum(layer.last_generalist_share for layer in self.layers) / len(self.layers) * nll.numel()
        return math.exp(total / count), share / count


def aggregate(clients: Sequence[Client]) -> int:
    """Average the generalists of all clients that hold any, copy the average back; returns bytes sent.

    Clients without generalists (the local baseline) do not take part. All participating clients
    must hold the same number of generalists (they are the shared part of the model).
    """
    sharing = [c for c in clients if c.moe.n_generalists]
    if len(sharing) < 2:
        return 0
    per_client = [c.generalist_states() for c in sharing]
    averaged = [average_states([states[layer] for states in per_client]) for layer in range(len(per_client[0]))]
    for client in sharing:
        client.load_generalists(averaged)
    bytes_per_client = sum(t.numel() * t.element_size() for layer in per_client[0] for t in layer.values())
    return 2 * bytes_per_client * len(sharing)  # upload + download


def train_federated(clients: Sequence[Client], cfg: CoMiGSConfig) -> dict[str, float]:
    """Run ``cfg.rounds`` rounds (aggregate, then local training), then a final aggregation."""
    sent = 0
    last_losses: list[float] = []
    for _ in range(cfg.rounds):
        if cfg.share_generalists:
            sent += aggregate(clients)
        last_losses = [c.local_round() for c in clients]
    if cfg.share_generalists:
        sent += aggregate(clients)
    return {
        "bytes_sent": float(sent),
        "final_train_loss": sum(last_losses) / max(len(last_losses), 1),
        "forward_backward": float(sum(c.forward_backward for c in clients)),
    }
