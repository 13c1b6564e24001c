"""Per-user CoMiGS mixtures trained online: the personaliser's second adapter kind.

``MixtureTrainer`` has the ``AdapterTrainer`` interface (``update``, ``score``, ``margins``,
``set_base``), so the personalisation agent drives either. What it trains for a user is a
``models.adapters.mixture`` mixture on the MLPs of the last ``last_layers`` layers: generalist
LoRA experts (the round's aggregate is copied in before each update, as a CoMiGS client copies
the server's generalists in at the start of a round), the user's specialists and a top-k token
router. One update is CoMiGS's bi-level alternation on the user's own signals:

- the signals are split deterministically (by signal id) into a *training* and a *validation*
  share (``val_share``);
- each step updates the experts (generalists and specialists) on a training batch with the
  same DPO + SFT loss as the LoRA adapters (``preference_loss``) plus the routing balance loss;
- every ``router_every`` expert steps, ``router_steps`` router updates on a validation batch
  (experts fixed): the router learns the mix that generalises for this user;
- ASLS decides *when* the user's mixture updates and *how much* (expert learning rate and step
  count); the router's learning rate is constant, as in CoMiGS.

Users hold different numbers of specialists: ``1 + n_signals // signals_per_specialist``, at
most ``max_specialists`` (more data, more local capacity). A new specialist starts as a copy of
the user's first one (its router row too), so growing changes only how ties are routed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from core.artifacts import store_directory
from core.moe.lora_moe import MoELoRAMLP
from core.personalization import PreferencePair, SftTarget
from models.adapters.mixture import (
    MixtureSet,
    MixtureSpec,
    build_layers,
    load_mixture_state,
    mixture_state,
    read_mixture,
    write_mixture,
)
from models.adapters.pin import write_pin
from models.adapters.trainer import AdapterConfig, AdapterUpdate, _cycler, preference_loss, rebase_model
from models.adapters.trunk import ChatEncoder, EncodedPair, TrunkScorer

log = logging.getLogger(__name__)

WORKING = "__working__"
GENERALIST_FILE = "generalist.safetensors"


@dataclass(frozen=True)
class MixtureConfig:
    loss: AdapterConfig = field(default_factory=AdapterConfig)
    """Encoding, DPO/SFT loss, batch and budget settings shared with the LoRA adapters (its
    ``rank``, ``alpha`` and ``target_modules`` are not used here)."""
    last_layers: int = 2
    rank: int = 8
    alpha: float = 16.0
    top_k: int = 2
    n_generalists: int = 1
    max_specialists: int = 3
    signals_per_specialist: int = 48
    val_share: float = 0.2
    """Share of a user's signals held out for the router (at least one when there are two)."""
    router_every: int = 2
    router_steps: int = 1
    router_lr: float = 1e-2
    balance_weight: float = 0.01

    def __post_init__(self) -> None:
        if self.last_layers < 1 or self.max_specialists < 1 or self.signals_per_specialist < 1:
            raise ValueError(f"need last_layers, max_specialists, signals_per_specialist >= 1; got "
                             f"{self.last_layers}, {self.max_specialists}, {self.signals_per_specialist}")
        if not 0.0 <= self.val_share < 1.0 or self.router_every < 1 or self.router_steps < 0:
            raise ValueError(f"need 0 <= val_share < 1, router_every >= 1, router_steps >= 0; got "
                             f"{self.val_share}, {self.router_every}, {self.router_steps}")

    def n_specialists(self, n_signals: int) -> int:
        return max(1, min(self.max_specialists, 1 + n_signals // self.signals_per_specialist))


def is_validation(signal_id: str, share: float) -> bool:
    """Deterministic split: the same signal always lands on the same side."""
    value = int.from_bytes(hashlib.sha256(signal_id.encode()).digest()[:4], "big") / 2**32
    return value < share


def generalist_state(layers: Sequence[MoELoRAMLP]) -> dict[str, torch.Tensor]:
    """The generalist experts' tensors, ``layer<i>.experts.<e>.*`` (what a round averages)."""
    return {f"layer{i}.{name}": t for i, layer in enumerate(layers) for name, t in layer.generalist_state().items()}


class MixtureTrainer:
    """Trains per-user mixtures on one base model; not thread-safe (one update at a time)."""

    def __init__(self, model: Any, tokenizer: Any, config: MixtureConfig, store_root: Path,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.model = model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        self.store_root = Path(store_root)
        self.clock = clock
        n_layers = int(model.config.num_hidden_layers)
        if config.last_layers > n_layers:
            raise ValueError(f"last_layers={config.last_layers} exceeds the model's {n_layers} layers")
        self.layers_idx = tuple(range(n_layers - config.last_layers, n_layers))
        c = config.loss
        self.encoder = ChatEncoder(tokenizer, c.max_prompt_tokens, c.max_response_tokens)
        self.scorer = TrunkScorer(model, config.last_layers, c.trunk_cache_size)
        self.mixtures = MixtureSet(model)
        self.base_version = "base"
        self._ref: OrderedDict[tuple[int, ...], float] = OrderedDict()
        self._loaded: str | None = None
        self._layers: list[MoELoRAMLP] = []
        self._spec: MixtureSpec | None = None

    @classmethod
    def from_catalog(cls, name: str, store_root: Path, config: MixtureConfig | None = None) -> MixtureTrainer:
        from models.loader import load_model

        loaded = load_model(name)
        config = config or MixtureConfig()
        return cls(loaded.model, loaded.tokenizer, replace(config, loss=replace(config.loss, base_model_name=name)),
                   store_root)

    # --- the working mixture -----------------------------------------------------------------------
    def spec_for(self, n_specialists: int) -> MixtureSpec:
        c = self.config
        return MixtureSpec(layers=self.layers_idx, n_generalists=c.n_generalists, n_specialists=n_specialists,
                           rank=c.rank, alpha=c.alpha, top_k=c.top_k)

    def _install(self, spec: MixtureSpec, state: dict[str, torch.Tensor] | None) -> None:
        torch.manual_seed(self.config.loss.seed)  # fresh experts: reproducible A, B = 0
        layers = build_layers(self.model, spec)
        if state is not None:
            load_mixture_state(layers, state)
        self._layers, self._spec = layers, spec
        self.mixtures.add(WORKING, spec, layers)

    def load(self, mixture_dir: Path | None, n_specialists: int = 1) -> None:
        """Put a user's mixture (or a fresh one with ``n_specialists``) into the working slot."""
        key = f"{mixture_dir}:{n_specialists}" if mixture_dir is None else str(mixture_dir)
        if self._loaded == key:
            return
        if mixture_dir is None:
            self._install(self.spec_for(n_specialists), None)
        else:
            spec, state = read_mixture(Path(mixture_dir))
            if spec.layers != self.layers_idx:
                raise ValueError(f"mixture {mixture_dir} adapts layers {spec.layers}, this trainer {self.layers_idx}")
            self._install(spec, state)
        self._loaded = key

    def grow(self, n_specialists: int) -> None:
        """Add specialists (copies of the first one, router rows included) up to ``n_specialists``."""
        spec = self._spec
        assert spec is not None
        if n_specialists <= spec.n_specialists:
            return
        old = mixture_state(self._layers)
        grown = replace(spec, n_specialists=n_specialists)
        g, first = spec.n_generalists, spec.n_generalists  # index of the first specialist
        state: dict[str, torch.Tensor] = {}
        for key, tensor in old.items():
            layer, rest = key.split(".", 1)
            if rest == "router.weight":
                extra = tensor[first:first + 1].repeat(n_specialists - spec.n_specialists, 1)
                state[key] = torch.cat([tensor, extra])
            else:
                state[key] = tensor
                if rest.startswith(f"experts.{first}."):
                    for e in range(g + spec.n_specialists, g + n_specialists):
                        state[f"{layer}.experts.{e}.{rest.split('.', 2)[2]}"] = tensor.clone()
        self._install(grown, state)
        self._loaded = None

    def copy_generalists(self, generalist_dir: Path | None) -> None:
        """Copy a round's aggregated generalists in (CoMiGS: the client loads the server's copy)."""
        if generalist_dir is None:
            return
        from safetensors.torch import load_file

        state = load_file(str(Path(generalist_dir) / GENERALIST_FILE))
        params = {f"layer{i}.{n}": p for i, layer in enumerate(self._layers) for n, p in layer.named_parameters()}
        with torch.no_grad():
            for key, tensor in state.items():
                if key in params and params[key].shape == tensor.shape:
                    params[key].copy_(tensor)
        self._loaded = None

    def save(self) -> tuple[str, Path]:
        assert self._spec is not None
        with tempfile.TemporaryDirectory(prefix="mixture-") as tmp:
            write_mixture(Path(tmp), self._spec, self._layers)
            write_pin(Path(tmp), self.config.loss.base_model_name, self.base_version)
            digest, path = store_directory(Path(tmp), self.store_root)
        self._loaded = str(path)
        return digest, path

    # --- caches (the same files as ``AdapterTrainer``'s: they depend on the base model only) ------
    def _cache_meta(self) -> dict[str, Any]:
        c = self.config.loss
        return {"base_model": c.base_model_name, "base_version": self.base_version, "split": self.scorer.split,
                "max_prompt": c.max_prompt_tokens, "max_response": c.max_response_tokens,
                "length_normalize": c.length_normalize, "hidden": int(self.model.config.hidden_size)}

    def save_caches(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"meta": self._cache_meta(), "trunk": self.scorer.export_states(), "ref": dict(self._ref)}, tmp)
        tmp.replace(path)

    def load_caches(self, path: Path) -> int:
        if not path.exists():
            return 0
        data = torch.load(path, weights_only=True)
        if data.get("meta") != self._cache_meta():
            log.warning("ignoring cache %s: saved for %s", path.name, data.get("meta"))
            return 0
        self.scorer.import_states(data["trunk"])
        self._ref.update({tuple(k): float(v) for k, v in data["ref"].items()})
        return len(data["trunk"])

    # --- scoring ---------------------------------------------------------------------------------
    def _encode(self, prompt: str, response: str) -> EncodedPair:
        return self.encoder.encode(prompt, response)

    def _reference(self, seqs: Sequence[EncodedPair]) -> torch.Tensor:
        """Base-model score of each sequence (no mixture), cached by token ids."""
        missing = list({s.ids: s for s in seqs if s.ids not in self._ref}.values())
        for start in range(0, len(missing), 16):
            chunk = missing[start:start + 16]
            with torch.no_grad(), self.mixtures.selected([None] * len(chunk)):
                sums, counts = self.scorer.logprobs(chunk)
            values = sums / counts if self.config.loss.length_normalize else sums
            for s, v in zip(chunk, values.tolist(), strict=True):
                self._ref[s.ids] = v
        out = torch.tensor([self._ref[s.ids] for s in seqs])
        while len(self._ref) > 4 * self.config.loss.trunk_cache_size:
            self._ref.popitem(last=False)
        return out

    def _policy(self, seqs: Sequence[EncodedPair]) -> torch.Tensor:
        with self.mixtures.selected([WORKING] * len(seqs)):
            sums, counts = self.scorer.logprobs(seqs)
        return sums / counts if self.config.loss.length_normalize else sums

    @torch.no_grad()
    def score(self, prompt: str, responses: Sequence[str], adapter_dir: Path | None) -> list[float]:
        seqs = [self._encode(prompt, r) for r in responses]
        if adapter_dir is None:
            return self._reference(seqs).tolist()
        self.load(adapter_dir)
        return self._policy(seqs).tolist()

    def margins(self, pairs: Sequence[PreferencePair], adapter_dir: Path | None) -> list[float]:
        out = []
        for p in pairs:
            chosen, rejected = self.score(p.prompt, [p.chosen, p.rejected], adapter_dir)
            out.append(chosen - rejected)
        return out

    def set_base(self, version: str, checkpoint_dir: Path | None) -> None:
        self.base_version = rebase_model(self.model, checkpoint_dir, version, self.base_version)
        self.scorer.clear()
        self._ref.clear()

    # --- training --------------------------------------------------------------------------------
    def update(self, user_id: str, pairs: Sequence[PreferencePair], sft_targets: Sequence[SftTarget],
               previous_adapter_dir: Path | None, *, lr: float, steps: int, time_budget_s: float,
               generalist_dir: Path | None = None) -> AdapterUpdate:
        """One bi-level update of the user's mixture, stored content-addressed (see the module doc)."""
        if steps < 0 or lr <= 0 or time_budget_s < 0:
            raise ValueError(f"need steps >= 0, lr > 0, time_budget_s >= 0; got {steps}, {lr}, {time_budget_s}")
        c, loss_cfg = self.config, self.config.loss
        t0 = self.clock()
        want = c.n_specialists(len(pairs) + len(sft_targets))
        self.load(previous_adapter_dir, want)
        self.grow(want)
        self.copy_generalists(generalist_dir)
        train_pairs = [p for p in pairs if not is_validation(p.signal_id, c.val_share)]
        val_pairs = [p for p in pairs if is_validation(p.signal_id, c.val_share)]
        train_sft = [t for t in sft_targets if not is_validation(t.signal_id, c.val_share)]
        val_sft = [t for t in sft_targets if is_validation(t.signal_id, c.val_share)]
        if not train_pairs and not train_sft:  # everything fell on the validation side: train on it
            train_pairs, train_sft = val_pairs, val_sft
        data = {name: ([(self._encode(p.prompt, p.chosen), self._encode(p.prompt, p.rejected)) for p in ps],
                       [p.weight for p in ps], [self._encode(t.prompt, t.target) for t in ts], [t.weight for t in ts])
                for name, ps, ts in (("train", train_pairs, train_sft), ("val", val_pairs, val_sft))}
        flat = [s for d in data.values() for pair in d[0] for s in pair]
        ref = dict(zip([s.ids for s in flat], self._reference(flat).tolist(), strict=True)) if flat else {}
        self.scorer.trunk_states(flat + [s for d in data.values() for s in d[2]])
        prep = self.clock() - t0
        rng = random.Random(f"{loss_cfg.seed}:{user_id}:{previous_adapter_dir}")
        orders = {name: (_cycler(len(d[0]), rng), _cycler(len(d[2]), rng)) for name, d in data.items()}
        experts = [p for layer in self._layers for p in layer.experts.parameters()]
        routers = [p for layer in self._layers for p in layer.router_parameters()]
        expert_opt = torch.optim.AdamW(experts, lr=lr, weight_decay=0.0)
        router_opt = torch.optim.AdamW(routers, lr=c.router_lr, weight_decay=0.0) if routers else None
        has_val = bool(data["val"][0] or data["val"][2])
        losses: list[float] = []
        accuracies: list[float] = []
        done, router_done, stopped_by_time = 0, 0, False
        step_start: float | None = None

        def one_step(name: str, params: list[torch.nn.Parameter], opt: torch.optim.Optimizer
                     ) -> tuple[float, float | None]:
            pair_seqs, pair_w, sft_seqs, sft_w = data[name]
            pair_order, sft_order = orders[name]
            p_idx = [next(pair_order) for _ in range(min(loss_cfg.pairs_per_step, len(pair_seqs)))]
            s_idx = [next(sft_order) for _ in range(min(loss_cfg.sft_per_step, len(sft_seqs)))]
            chosen = [pair_seqs[i] for i in p_idx]
            seqs = [s for pair in chosen for s in pair] + [sft_seqs[i] for i in s_idx]
            loss, acc = preference_loss(self._policy(seqs), chosen, [pair_w[i] for i in p_idx],
                                        [sft_seqs[i] for i in s_idx], [sft_w[i] for i in s_idx], ref, loss_cfg)
            if routers and c.balance_weight:
                loss = loss + c.balance_weight * torch.stack([layer.last_balance_loss for layer in self._layers]).mean()
            expert_opt.zero_grad(set_to_none=True)
            if router_opt is not None:
                router_opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, loss_cfg.max_grad_norm)
            opt.step()
            return float(loss.detach()), acc

        with torch.enable_grad():
            for layer in self._layers:
                layer.train()
            try:
                while done < steps and (data["train"][0] or data["train"][2]):
                    now = self.clock()
                    elapsed = now - t0
                    mean_step = (now - step_start) / done if step_start is not None and done else 0.0
                    if elapsed >= time_budget_s or (done and elapsed + mean_step > time_budget_s):
                        stopped_by_time = True
                        break
                    if step_start is None:
                        step_start = now
                    value, acc = one_step("train", experts, expert_opt)
                    losses.append(value)
                    if acc is not None:
                        accuracies.append(acc)
                    done += 1
                    if router_opt is not None and has_val and done % c.router_every == 0:
                        for _ in range(c.router_steps):
                            one_step("val", routers, router_opt)
                            router_done += 1
            finally:
                for layer in self._layers:
                    layer.eval()
        digest, path = self.save()
        assert self._spec is not None
        share = sum(layer.last_generalist_share for layer in self._layers) / len(self._layers)
        metrics = {
            "steps": float(done), "steps_requested": float(steps), "router_steps": float(router_done),
            "stopped_by_time": float(stopped_by_time),
            "loss_first": losses[0] if losses else float("nan"), "loss_last": losses[-1] if losses else float("nan"),
            "pair_accuracy_first": accuracies[0] if accuracies else float("nan"),
            "pair_accuracy_last": accuracies[-1] if accuracies else float("nan"),
            "seconds": self.clock() - t0, "prep_seconds": prep, "n_pairs": float(len(pairs)),
            "n_sft": float(len(sft_targets)), "n_validation": float(len(val_pairs) + len(val_sft)),
            "warm_start": float(previous_adapter_dir is not None), "specialists": float(self._spec.n_specialists),
            "generalist_share": float(share), "generalist_copied": float(generalist_dir is not None),
        }
        log.info("mixture for %s: %d expert + %d router steps, %d specialists, loss %.4f -> %.4f, %s", user_id,
                 done, router_done, self._spec.n_specialists, metrics["loss_first"], metrics["loss_last"], digest[:12])
        parent = previous_adapter_dir.name if previous_adapter_dir is not None else None
        return AdapterUpdate(digest, path, metrics, parent)


def aggregate_generalists(mixture_dirs: Sequence[Path], store_root: Path) -> tuple[str, Path]:
    """A round: the uniform (1/N) average of the users' trained generalists, stored by hash."""
    from safetensors.torch import save_file

    from core.moe.lora_moe import average_states

    states = []
    for directory in mixture_dirs:
        spec, state = read_mixture(Path(directory))
        states.append({k: v for k, v in state.items()
                       if ".experts." in k and int(k.split(".experts.")[1].split(".")[0]) < spec.n_generalists})
    averaged = average_states(states)
    with tempfile.TemporaryDirectory(prefix="generalist-") as tmp:
        save_file({k: averaged[k].contiguous() for k in sorted(averaged)}, str(Path(tmp) / GENERALIST_FILE),
                  metadata={"format": "pt"})
        (Path(tmp) / "generalist.json").write_text(json.dumps({"users": len(states)}))
        return store_directory(Path(tmp), store_root)
