"""Decision latency of ``EagleRanker.route`` at a large feedback history (embedding excluded).

The real data have about 15k prompts, so the 100k-item history is the real embeddings plus
jittered copies (Gaussian noise, renormalised; cosine about 0.9 to their source) carrying their
source's outcomes. Queries are fresh jitters of real prompts, so no query is in the index.
Each decision is timed alone with ``perf_counter_ns`` after a warm-up, with the cyclic garbage
collector paused for the loop (a long-lived agent should ``gc.freeze()`` its restored state so
full collections do not walk it); the index's recall of
the N nearest against exact search is reported beside it, because a fast wrong answer is not a
decision. ``p50``/``p99`` are wall-clock; ``cpu_p50``/``cpu_p99`` count only this thread's CPU
time, which separates the decision's own cost from time spent descheduled on a shared machine.
Embedding time (one prompt at a time, MiniLM on CPU) is reported apart.
"""

from __future__ import annotations

import gc
import time

import numpy as np

from bench.routing_data import STRONG, WEAK
from core.routing import EagleConfig, EagleRanker, FeedbackItem, from_graded
from core.routing.index import NeighbourIndex

JITTER = 0.48
"""Noise scale: cos(v, v + noise) ~ 1 / sqrt(1 + JITTER**2) ~ 0.9 for unit v in 384-d."""


def _jitter(vectors: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    noise = rng.normal(size=vectors.shape).astype(np.float32) * (JITTER / np.sqrt(vectors.shape[1]))
    out = vectors + noise
    normalised: np.ndarray = out / np.linalg.norm(out, axis=1, keepdims=True)
    return normalised


def decision_latency(
    embeddings: np.ndarray,
    correct: np.ndarray,
    config: EagleConfig,
    history: int,
    queries: int,
    seed: int,
) -> dict[str, float | int | str]:
    rng = np.random.default_rng([seed, 4])
    source = rng.integers(0, len(embeddings), size=history)
    source[: min(history, len(embeddings))] = np.arange(min(history, len(embeddings)))
    vectors = embeddings[source].copy()
    copies = np.arange(history) >= len(embeddings)
    vectors[copies] = _jitter(vectors[copies], rng)

    ranker = EagleRanker(config, NeighbourIndex())
    start = time.perf_counter()
    for i in range(history):
        y = correct[source[i]]
        ranker.apply(FeedbackItem(f"h{i}", f"h{i}", from_graded({WEAK: y[0], STRONG: y[1]}), vectors[i]))
    build_s = time.perf_counter() - start

    query_vectors = _jitter(embeddings[rng.integers(0, len(embeddings), size=queries)], rng)
    candidates = {WEAK: 6e-5, STRONG: 1.2e-3}
    live = {WEAK, STRONG}
    for q in query_vectors[:50]:  # warm caches and permutation tables
        ranker.route(q, candidates, None, 1.0, live)
    times = np.empty(queries)
    cpu = np.empty(queries)
    gc.collect()
    gc.disable()  # the whole timed loop, as timeit does (see bench.routing.quiet_gc)
    try:
        for i, q in enumerate(query_vectors):
            c0, t0 = time.thread_time_ns(), time.perf_counter_ns()
            ranker.route(q, candidates, None, 1.0, live)
            times[i] = (time.perf_counter_ns() - t0) / 1e6
            cpu[i] = (time.thread_time_ns() - c0) / 1e6
    finally:
        gc.enable()

    hits = 0
    probes = query_vectors[:200]
    for q in probes:
        approx = set(ranker.index.search_rows(q, config.neighbours)[0].tolist())
        exact = set(ranker.index.search_exact(q, config.neighbours)[0].tolist())
        hits += len(approx & exact)
    index = ranker.index
    return {
        "p50": float(np.percentile(times, 50)),
        "p99": float(np.percentile(times, 99)),
        "cpu_p50": float(np.percentile(cpu, 50)),
        "cpu_p99": float(np.percentile(cpu, 99)),
        "history": history,
        "queries": queries,
        "recall_at_n": hits / (config.neighbours * len(probes)),
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
