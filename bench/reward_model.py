"""``flywheel bench reward-model``: how well the rewarder's online reward model learns real answers'
quality from feedback, and when it would be trusted to score rollouts.

Data: GSM8K answers of two real models with their correctness (``data/routellm/gsm8k``, or any
folder with ``gsm8k/gsm8k_responses.csv`` holding a ``prompt`` column and, per model, a boolean
``<model>`` column and a ``<model>_response`` column). Simulated users rate what they were shown
by correctness: a thumb per answer (up when correct) and, when exactly one of the two answers is
correct, a pairwise preference for it. Per seed the questions are shuffled; 80 % of them feed the
stream (in that order), 20 % are a test set never streamed.

Each variant is the same ``core.reward_model.RewardModel`` (same defaults, the live rewarder's)
fed the same stream; only the features differ: ``full`` (the live features: response embedding,
prompt x response product, cosine, text statistics), ``embedding`` (response embedding only),
``text-stats`` (the five cheap statistics only). Streams: ``mixed`` (thumbs and preferences as they
come), ``thumbs``, ``pairwise``.

Reported per variant and stream, mean and min/max over seeds: the live metric at the end of the
stream (balanced accuracy on the rolling held-out window), overall and on each model's answers
(the live gate is per model), the examples needed before the live gate would open for some model
(``usable_after_examples``; ``null`` if never) and the share of the stream during which it was
open for some model (``gate_open_share``, checked every 10 examples), beside when a single gate over all held-out
examples would have opened (``unscoped_gate_after_examples``, what a gate that ignores which
model wrote an answer would do), the seeds whose gate is open per model at the end, and on the
test set: balanced thumbs accuracy over all answers, *within each model's
answers* (can it tell a model's right answers from its wrong ones, which is what scoring one
model's rollouts needs), and pairwise accuracy. A model that calls everything good scores 0.5 on
every balanced figure. Quality figures depend only on the seed, not on time.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from core.reward_model import (
    TEXT_FEATURES,
    Example,
    Label,
    RewardModel,
    RewardModelConfig,
    response_features,
)
from infra.settings import get_settings

DEFAULT_DATA = Path(__file__).resolve().parent.parent / "data" / "routellm"
VARIANTS = ("full", "embedding", "text-stats")
STREAMS = ("mixed", "thumbs", "pairwise")
EMBEDDING_DIM = 384


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder holding gsm8k/gsm8k_responses.csv")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--questions", type=int, default=0, help="use the first N questions (0: all)")
    parser.add_argument("--quick", action="store_true", help="200 questions, 2 seeds (a smoke test)")
    parser.add_argument("--confidence-z", type=float, default=None,
                        help="standard errors the gate takes off (default: the live rewarder's)")


@dataclass(frozen=True)
class Answers:
    prompts: list[str]
    models: list[str]
    texts: list[list[str]]
    """texts[q][m]: model m's answer to question q."""
    correct: np.ndarray
    """(questions, models) booleans."""


def load(data_dir: Path, limit: int = 0) -> Answers:
    path = data_dir / "gsm8k" / "gsm8k_responses.csv"
    csv.field_size_limit(1 << 24)
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        columns = reader.fieldnames or []
        models = sorted(c for c in columns if c != "prompt" and f"{c}_response" in columns)
        if not models or "prompt" not in columns:
            raise ValueError(f"{path} needs a prompt column and <model>, <model>_response columns, has {columns}")
        rows = list(reader)
    rows = rows[:limit] if limit else rows
    return Answers([r["prompt"] for r in rows], models, [[r[f"{m}_response"] for m in models] for r in rows],
                   np.array([[r[m].strip().lower() == "true" for m in models] for r in rows], dtype=bool))


def featurize(answers: Answers, cache_dir: Path | None = None) -> tuple[np.ndarray, float | None]:
    """(questions, models, feature_dim) live features of every answer, and the seconds spent
    embedding (None when read from ``cache_dir``, keyed by the texts and the embedding model)."""
    from core.embedding import MODEL_NAME

    digest = hashlib.sha256(MODEL_NAME.encode())
    for prompt, texts in zip(answers.prompts, answers.texts, strict=True):
        for text in (prompt, *texts):
            digest.update(len(text).to_bytes(8, "big"))
            digest.update(text.encode())
    path = cache_dir / f"gsm8k-{digest.hexdigest()[:16]}.npy" if cache_dir else None
    if path is not None and path.exists():
        return np.load(path), None
    started = time.perf_counter()
    features = _featurize(answers)
    seconds = time.perf_counter() - started
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path.with_suffix(".tmp.npy"), features)
        path.with_suffix(".tmp.npy").rename(path)
    return features, seconds


def _featurize(answers: Answers) -> np.ndarray:
    from core.embedding import get_embedder

    embedder = get_embedder()
    prompts = embedder.embed(answers.prompts)
    out = []
    for m in range(len(answers.models)):
        texts = [t[m] for t in answers.texts]
        out.append(response_features(prompts, embedder.embed(texts), texts))
    return np.stack(out, axis=1)


def select(features: np.ndarray, variant: str) -> np.ndarray:
    if variant == "full":
        return features
    if variant == "embedding":
        return features[..., :EMBEDDING_DIM]
    return features[..., -TEXT_FEATURES:]


def stream(order: np.ndarray, correct: np.ndarray, x: np.ndarray, kind: str, seed: int,
           models: list[str]) -> list[Example]:
    out: list[Example] = []
    for q in order:
        if kind in ("mixed", "thumbs"):
            for m in range(correct.shape[1]):
                out.append(Example(f"s{seed}-q{q}-m{m}", Label("pointwise", (f"{q}/{m}",), float(correct[q, m])),
                                   x[q, m], models[m]))
        if kind in ("mixed", "pairwise") and correct.shape[1] == 2 and correct[q, 0] != correct[q, 1]:
            out.append(Example.of(f"s{seed}-q{q}-pair", Label("pairwise", (f"{q}/0", f"{q}/1"),
                                                              float(correct[q, 0])), [x[q, 0], x[q, 1]], models))
    return out


def balanced(scores: np.ndarray, good: np.ndarray) -> float | None:
    if good.all() or not good.any():
        return None
    return float(((scores[good] > 0).mean() + (scores[~good] < 0).mean()) / 2)


def test_figures(model: RewardModel, test: np.ndarray, correct: np.ndarray, x: np.ndarray) -> dict[str, Any]:
    scores = np.stack([model.scores(x[test, m]) for m in range(correct.shape[1])], axis=1)
    good = correct[test]
    within = {str(m): balanced(scores[:, m], good[:, m]) for m in range(correct.shape[1])}
    pair = good[:, 0] != good[:, 1] if correct.shape[1] == 2 else np.zeros(len(test), dtype=bool)
    pairwise = float(((scores[pair, 0] > scores[pair, 1]) == good[pair, 0]).mean()) if pair.any() else None
    return {"thumbs": balanced(scores.ravel(), good.ravel()), "within_model": within, "pairwise": pairwise}


def one_run(features: np.ndarray, answers: Answers, variant: str, kind: str, seed: int,
            config: RewardModelConfig) -> dict[str, Any]:
    correct = answers.correct
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(correct))
    cut = int(0.8 * len(order))
    x = select(features, variant)
    model = RewardModel(replace(config, dim=x.shape[-1], seed=seed))
    usable_after: float | None = None
    unscoped_after: float | None = None
    checks = opened = 0
    for i, example in enumerate(stream(order[:cut], correct, x, kind, seed, answers.models), start=1):
        model.update(example)
        if i % 10:
            continue
        is_open = any(model.usable(m) for m in answers.models)
        checks, opened = checks + 1, opened + int(is_open)
        if usable_after is None and is_open:
            usable_after = i
        if unscoped_after is None and model.usable():
            unscoped_after = i
    return {"live_accuracy": model.accuracy().balanced, "heldout": model.accuracy().heldout,
            "live_per_model": {m: model.accuracy(m).balanced for m in answers.models},
            "examples": model.seen, "usable_after": usable_after, "unscoped_after": unscoped_after,
            "open_share": opened / checks if checks else 0.0,
            "usable_at_end": {m: model.usable(m) for m in answers.models},
            "test": test_figures(model, order[cut:], correct, x)}


def spread(values: list[float | None]) -> dict[str, float] | None:
    kept = [v for v in values if v is not None]
    if not kept:
        return None
    return {"mean": round(statistics.fmean(kept), 4), "min": round(min(kept), 4), "max": round(max(kept), 4),
            "n": len(kept)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    seeds = list(range(2 if args.quick else args.seeds))
    answers = load(args.data, 200 if args.quick else args.questions)
    features, embed_s = featurize(answers, get_settings().home.resolve() / "cache" / "reward-model")
    config = RewardModelConfig(dim=1)
    if args.confidence_z is not None:
        config = replace(config, confidence_z=args.confidence_z)
    results: dict[str, Any] = {}
    for kind in STREAMS:
        for variant in VARIANTS:
            runs = [one_run(features, answers, variant, kind, s, config) for s in seeds]
            results[f"{kind}/{variant}"] = {
                "live_accuracy": spread([r["live_accuracy"] for r in runs]),
                "live_accuracy_per_model": {m: spread([r["live_per_model"][m] for r in runs]) for m in answers.models},
                "usable_after_examples": spread([r["usable_after"] for r in runs]),
                "unscoped_gate_after_examples": spread([r["unscoped_after"] for r in runs]),
                "gate_open_share": spread([r["open_share"] for r in runs]),
                "usable_at_end": {m: sum(r["usable_at_end"][m] for r in runs) for m in answers.models},
                "examples": runs[0]["examples"],
                "test_thumbs": spread([r["test"]["thumbs"] for r in runs]),
                "test_within_model": {answers.models[int(m)]: spread([r["test"]["within_model"][m] for r in runs])
                                      for m in runs[0]["test"]["within_model"]},
                "test_pairwise": spread([r["test"]["pairwise"] for r in runs]),
            }
    threshold = config.min_accuracy
    return {"data": str(args.data.name), "questions": len(answers.prompts), "models": answers.models,
            "correct_share": {m: round(float(answers.correct[:, i].mean()), 4) for i, m in enumerate(answers.models)},
            "seeds": seeds, "threshold": threshold, "confidence_z": config.confidence_z,
            "embed_seconds": round(embed_s, 1) if embed_s is not None else "cached", "results": results}
