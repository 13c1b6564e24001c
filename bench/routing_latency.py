"""Decision latency of the default router's ``route`` at a large history (embedding excluded).

The history is ``history`` feedback items over ``models`` models: the data set's real embeddings
plus jittered copies (Gaussian noise, renormalised; cosine about 0.9 to their source), each
carrying a bandit observation (one model, outcome drawn from a per-model rate), as live traffic
does. Queries are fresh jitters, so no query is in the index. Each decision is timed alone with
``perf_counter_ns`` after a warm-up, with the cyclic GC paused for the loop, and includes the
exploration draw (every query carries a request id). ``recall_at_n`` compares the index's N
nearest with exact search: a fast wrong answer is not a decision. ``cpu_*`` count only this
thread's CPU time, which separates the decision's cost from time spent descheduled on a shared
machine. Embedding time (one prompt at a time, MiniLM on CPU) is reported apart.
"""

from __future__ import annotations

import gc
import time

import numpy as np

from core.routing import LocalQualityConfig, LocalQualityRanker, Observation, ObservationItem
from core.routing.index import NeighbourIndex

JITTER = 0.48
"""Noise scale: cos(v, v + noise) ~ 1 / sqrt(1 + JITTER**2) ~ 0.9 for unit v in 384-d."""


def _jitter(vectors: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    noise = rng.normal(size=vectors.shape).astype(np.float32) * (JITTER / np.sqrt(vectors.shape[1]))
    out = vectors + noise
    normalised: np.ndarray = out / np.linalg.norm(out, axis=1, keepdims=True)
    return normalised


def decision_latency(embeddings: np.ndarray, config: LocalQualityConfig, history: int, models: int, queries: int,
                     seed: int) -> dict[str, float | int | str]:
    rng = np.random.default_rng([seed, 4])
    source = rng.integers(0, len(embeddings), size=history)
    source[: min(history, len(embeddings))] = np.arange(min(history, len(embeddings)))
    vectors = embeddings[source].copy()
    copies = np.arange(history) >= len(embeddings)
    vectors[copies] = _jitter(vectors[copies], rng)
    names = [f"m{j:02d}" for j in range(models)]
    rates = rng.uniform(0.3, 0.9, size=models)
    chosen = rng.integers(0, models, size=history)
    outcomes = rng.random(history) < rates[chosen]

    ranker = LocalQualityRanker(config, NeighbourIndex())
    ranker.add_models(names)
    start = time.perf_counter()
    batch = 1000
    for lo in range(0, history, batch):
        ranker.apply_many(ObservationItem(f"h{i}", f"h{i}", (Observation(names[chosen[i]], float(outcomes[i])),),
                                          vectors[i]) for i in range(lo, min(lo + batch, history)))
    build_s = time.perf_counter() - start

    query_vectors = _jitter(embeddings[rng.integers(0, len(embeddings), size=queries)], rng)
    candidates = {m: 1e-5 * (1 + j) for j, m in enumerate(names)}
    live = set(names)
    for i, q in enumerate(query_vectors[:50]):  # warm caches
        ranker.route(q, candidates, None, 1.0, live, request_id=f"warm{i}")
    times = np.empty(queries)
    cpu = np.empty(queries)
    explored = 0
    gc.collect()
    gc.disable()
    try:
        for i, q in enumerate(query_vectors):
            c0, t0 = time.thread_time_ns(), time.perf_counter_ns()
            choice = ranker.route(q, candidates, None, 1.0, live, request_id=f"q{i}")
            times[i] = (time.perf_counter_ns() - t0) / 1e6
            cpu[i] = (time.thread_time_ns() - c0) / 1e6
            explored += choice.exploratory
    finally:
        gc.enable()

    hits = 0
    probes = query_vectors[:200]
    n = config.neighbours
    for q in probes:
        approx = set(ranker.index.search_rows(q, n)[0].tolist())
        exact = set(ranker.index.search_exact(q, n)[0].tolist())
        hits += len(approx & exact)
    index = ranker.index
    return {
        "p50": float(np.percentile(times, 50)),
        "p99": float(np.percentile(times, 99)),
        "cpu_p50": float(np.percentile(cpu, 50)),
        "cpu_p99": float(np.percentile(cpu, 99)),
        "history": history,
        "models": models,
        "queries": queries,
        "explored_share": explored / queries,
        "recall_at_n": hits / (n * len(probes)),
        "index": "exact" if index.is_exact else f"ivf nprobe={index.nprobe}",
        "build_s": build_s,
    }


def embedding_latency(texts: list[str]) -> dict[str, float]:
    """Milliseconds to embed one prompt at a time (model load excluded), and batched per prompt."""
    from core.embedding import get_embedder

    embedder = get_embedder()
    embedder.embed(texts[:2])  # warm-up
    single = []
    for text in texts:
        t0 = time.perf_counter_ns()
        embedder.embed([text])
        single.append((time.perf_counter_ns() - t0) / 1e6)
    t0 = time.perf_counter_ns()
    embedder.embed(texts)
    batched = (time.perf_counter_ns() - t0) / 1e6 / len(texts)
    return {"single_p50": float(np.percentile(single, 50)), "batched_per_prompt": batched}
