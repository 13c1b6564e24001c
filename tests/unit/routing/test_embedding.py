"""The packaged MiniLM embedder: shape, dtype, unit norm, and that similar prompts are closer."""

import numpy as np
import pytest

from core.embedding import EMBEDDING_DIM, locate_model_dir


def test_model_directory_is_located_without_importing_the_package():
    path = locate_model_dir()
    assert (path / "model.safetensors").exists()
    assert (path / "tokenizer.json").exists()


@pytest.mark.model
def test_embeddings_are_unit_norm_float32_and_meaningful():
    import torch

    from core.embedding import get_embedder

    torch.set_num_threads(1)
    embedder = get_embedder()
    assert get_embedder() is embedder  # one model per process
    texts = ["What is the capital of France?", "Which city is France's capital?",
             "Solve 12 * 7 and explain each step."]
    vectors = embedder.embed(texts)
    assert vectors.shape == (3, EMBEDDING_DIM) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2] + 0.2
    assert np.array_equal(embedder.embed(texts[:1])[0], embedder.embed(texts[:1])[0])
    assert embedder.embed([]).shape == (0, EMBEDDING_DIM)
