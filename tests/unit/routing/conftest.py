"""Factories for routing tests: deterministic random unit vectors and feedback streams."""

import numpy as np

from core.routing.feedback import FeedbackItem, from_graded, from_pairwise, from_thumbs

MODELS = ["big", "mid", "small"]


def unit_vectors(n: int, dim: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def clustered_vectors(
    n: int, dim: int, clusters: int, seed: int, spread: float = 0.3, point_seed: int | None = None
) -> np.ndarray:
    """Points around ``clusters`` centres fixed by ``seed``; ``point_seed`` draws other points."""
    rng = np.random.default_rng(seed if point_seed is None else point_seed)
    centres = unit_vectors(clusters, dim, seed + 1)
    v = centres[rng.integers(0, clusters, size=n)] + spread * rng.normal(size=(n, dim)) / np.sqrt(dim)
    v = v.astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def mixed_stream(n: int, dim: int, seed: int, pool=None) -> list[FeedbackItem]:
    """Pairwise, graded and thumbs feedback over ~n/2 distinct prompts (keys repeat)."""
    rng = np.random.default_rng(seed)
    vectors = unit_vectors(n, dim, seed + 7)
    seen: set[str] = set()
    items = []
    for i in range(n):
        key = f"p{int(rng.integers(0, max(1, n // 2)))}"
        emb = None if key in seen else vectors[i]
        seen.add(key)
        kind = i % 3
        if kind == 0:
            a, b = rng.choice(MODELS, size=2, replace=False)
            comps = from_pairwise(str(a), str(b), ("a", "b", "tie")[int(rng.integers(0, 3))])
        elif kind == 1:
            comps = from_graded({m: float(rng.integers(1, 11)) for m in MODELS})
        else:
            comps = from_thumbs(str(rng.choice(MODELS)), bool(rng.integers(0, 2)), pool or MODELS)
        items.append(FeedbackItem(f"f{i}", key, comps, emb))
    return items
