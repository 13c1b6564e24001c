"""Seeded many-model outcome tables grounded in real prompts (``flywheel bench routing-data``).

No public per-prompt outcome table for a dozen models can be shipped here (docs/bench/routing.md
lists what was checked), so this generator builds one on top of RouteLLM's real data:

* **Prompts and difficulty are real.** Each row is a real RouteLLM prompt (MMLU or GSM8K). Its
  real outcomes for GPT-4 and Mixtral give a difficulty signal ``r`` = number of those two that
  failed (0, 1 or 2); the latent difficulty is ``b = difficulty_scale * (r - mean r) + N(0,
  difficulty_noise^2)``, so prompts that real models found hard stay hard for every model.
* **Topics come from the embeddings.** Spherical k-means (seeded) splits the prompts' MiniLM
  embeddings into ``topics`` clusters; each cluster is one topic file. A router is never told the
  topic, but similar prompts share it, which is what a similarity router can exploit.
* **Models have prices, lengths and skills.** Model ``j`` of ``K`` (sorted by price) pays
  ``price_low * price_span ** (j / (K - 1))`` USD per million output tokens (input = output / 3),
  answers with ``output_tokens`` drawn log-uniformly in [40, 800] independently of price (prices
  span two orders of magnitude, lengths a factor of 20, so a verbose cheap model can cost as much
  as a terse mid-priced one). Its general ability is
  ``a_j = ability_slope * j / (K - 1) + N(0, ability_noise^2)`` (price buys ability, on average)
  and its skill on topic ``t`` is ``s_jt ~ N(0, skill_spread^2)``; ``specialists`` of the cheaper
  half each get ``+specialist_boost`` on ``specialist_topics`` random topics.
* **Outcomes.** ``P(model j answers prompt i) = sigmoid(offset + a_j + s_j,topic(i) - b_i)``, drawn
  once per row (0/1). Rows beyond the number of distinct prompts reuse prompts with fresh draws
  (the benchmark keeps a prompt's rows on one side of every split).

Three profiles make the default folder: ``premium`` (price buys quality; the priciest model is
the best single model), ``specialists`` (ability barely follows price and cheap specialists are
strong on their topics; a cheaper model is often the best single one) and ``balanced``.
Everything is a function of the seed; ``generator.json`` in the output records every drawn value.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from bench.routing_data import DEFAULT_CACHE_DIR, DEFAULT_DATA_DIR, Embed, cached_embeddings, load_folder
from core.routing.index import spherical_kmeans


@dataclass(frozen=True)
class Profile:
    """How one generated data set's fleet looks (see the module docstring for the model)."""

    name: str
    models: int = 12
    topics: int = 16
    price_low: float = 0.15
    """USD per million output tokens of the cheapest model."""
    price_span: float = 100.0
    """Priciest / cheapest output price."""
    ability_slope: float = 2.0
    ability_noise: float = 0.25
    skill_spread: float = 0.5
    specialists: int = 3
    specialist_topics: int = 2
    specialist_boost: float = 1.5
    offset: float = 0.3
    difficulty_scale: float = 1.3
    difficulty_noise: float = 0.8

    def __post_init__(self) -> None:
        if not 2 <= self.models <= 32 or self.topics < 1:
            raise ValueError(f"need 2 <= models <= 32 and topics >= 1; got models={self.models} topics={self.topics}")
        if self.price_low <= 0 or self.price_span < 1:
            raise ValueError(f"need price_low > 0 and price_span >= 1; got {self.price_low}, {self.price_span}")
        if self.specialists > self.models or self.specialist_topics > self.topics:
            raise ValueError(f"specialists={self.specialists} > models={self.models} or specialist_topics="
                             f"{self.specialist_topics} > topics={self.topics}")


PROFILES: dict[str, Profile] = {
    "premium": Profile("premium"),
    "specialists": Profile("specialists", ability_slope=0.6, ability_noise=0.4, skill_spread=0.7,
                           specialists=6, specialist_boost=2.2),
    "balanced": Profile("balanced", ability_slope=1.2, skill_spread=0.6, specialists=4, specialist_boost=1.8),
}


@dataclass(frozen=True)
class Fleet:
    """The drawn parameters of one generated fleet."""

    names: list[str]
    price_out: np.ndarray
    price_in: np.ndarray
    output_tokens: np.ndarray
    ability: np.ndarray
    skill: np.ndarray
    """(K, topics) topic skills, specialist boosts included."""
    specialists: dict[str, list[int]] = field(default_factory=dict)


def draw_fleet(profile: Profile, rng: np.random.Generator) -> Fleet:
    k = profile.models
    tier = np.arange(k) / max(1, k - 1)
    price_out = profile.price_low * profile.price_span ** tier
    ability = profile.ability_slope * tier + rng.normal(0.0, profile.ability_noise, size=k)
    skill = rng.normal(0.0, profile.skill_spread, size=(k, profile.topics))
    specialists: dict[str, list[int]] = {}
    names = [f"{profile.name}-m{j:02d}" for j in range(k)]
    cheap_half: list[int] = rng.permutation(max(1, k // 2))[: profile.specialists].tolist()
    for j in sorted(cheap_half):
        topics = sorted(int(t) for t in rng.choice(profile.topics, size=profile.specialist_topics, replace=False))
        skill[j, topics] += profile.specialist_boost
        specialists[names[j]] = topics
    output_tokens = np.round(np.exp(rng.uniform(math.log(40), math.log(800), size=k)))
    return Fleet(names, price_out, price_out / 3.0, output_tokens, ability, skill, specialists)


def difficulty(real_failures: np.ndarray, profile: Profile, rng: np.random.Generator) -> np.ndarray:
    """Latent difficulty from the real failure count (0..2) plus noise (see the module docstring)."""
    centred = real_failures - real_failures.mean()
    out: np.ndarray = profile.difficulty_scale * centred + rng.normal(0.0, profile.difficulty_noise,
                                                                      size=len(real_failures))
    return out


def success_probability(fleet: Fleet, topics: np.ndarray, hardness: np.ndarray, offset: float) -> np.ndarray:
    """(n, K) P(correct) = sigmoid(offset + ability + topic skill - difficulty)."""
    logit = offset + fleet.ability[None, :] + fleet.skill[:, topics].T - hardness[:, None]
    out: np.ndarray = 1.0 / (1.0 + np.exp(-logit))
    return out


def assign_topics(vectors: np.ndarray, topics: int, seed: int) -> np.ndarray:
    """Topic = nearest of ``topics`` spherical k-means centroids of the embeddings (seeded)."""
    centroids = spherical_kmeans(vectors.astype(np.float32), topics, iterations=20, seed=seed)
    out: np.ndarray = np.argmax(vectors @ centroids.T, axis=1)
    return out


@dataclass(frozen=True)
class Generated:
    profile: Profile
    fleet: Fleet
    rows: np.ndarray
    """Index of the source prompt of each row."""
    topics: np.ndarray
    probability: np.ndarray
    outcomes: np.ndarray


def generate_set(profile: Profile, real_failures: np.ndarray, vectors: np.ndarray, rows: int,
                 seed: int) -> Generated:
    """Outcomes for ``rows`` rows drawn from the source prompts (pure: no files, no embedder)."""
    rng = np.random.default_rng([seed, sum(profile.name.encode())])
    fleet = draw_fleet(profile, rng)
    source_topics = assign_topics(vectors, profile.topics, seed)
    n = len(real_failures)
    picked = rng.permutation(n)[:rows] if rows <= n else np.concatenate(
        [rng.permutation(n), rng.integers(0, n, size=rows - n)])
    hardness = difficulty(real_failures[picked].astype(np.float64), profile, rng)
    topics = source_topics[picked]
    probability = success_probability(fleet, topics, hardness, profile.offset)
    outcomes = (rng.random(probability.shape) < probability).astype(np.int8)
    return Generated(profile, fleet, picked, topics, probability, outcomes)


def write_set(out: Path, generated: Generated, prompts: list[str]) -> None:
    folder = out / generated.profile.name
    folder.mkdir(parents=True, exist_ok=True)
    names = generated.fleet.names
    for t in range(generated.profile.topics):
        members = np.flatnonzero(generated.topics == t)
        if len(members) == 0:
            continue
        with (folder / f"topic_{t:02d}.csv").open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["prompt", *names])
            for i in members.tolist():
                writer.writerow([prompts[generated.rows[i]], *generated.outcomes[i].tolist()])


def source_prompts(source: Path) -> tuple[list[str], np.ndarray]:
    """Distinct prompts of every two-model set in ``source`` and their real failure counts."""
    prompts: dict[str, float] = {}
    for data in load_folder(source).values():
        if data.k != 2:
            continue
        fails = 2.0 - data.correct.sum(axis=1)
        for prompt, f in zip(data.prompts, fails.tolist(), strict=True):
            prompts.setdefault(prompt, f)
    if not prompts:
        raise ValueError(f"{source} has no two-model data set to ground the generator in")
    return list(prompts), np.asarray(list(prompts.values()))


def generate_folder(out: Path, source: Path, rows: int, models: int, seed: int, cache_dir: Path,
                    profiles: list[str], embed: Embed | None = None) -> dict[str, Any]:
    """Write ``len(profiles)`` data sets of ``rows // len(profiles)`` rows each, plus models.json."""
    prompts, failures = source_prompts(source)
    vectors, _ = cached_embeddings(prompts, cache_dir, embed)
    per_set = rows // len(profiles)
    prices: dict[str, dict[str, float]] = {}
    record: dict[str, Any] = {"seed": seed, "rows_per_set": per_set, "source_prompts": len(prompts), "sets": {}}
    summary: dict[str, Any] = {}
    for name in profiles:
        base = PROFILES[name]
        profile = replace(base, models=models, specialists=min(base.specialists, max(1, models // 2)))
        generated = generate_set(profile, failures, vectors, per_set, seed)
        write_set(out, generated, prompts)
        fleet = generated.fleet
        for j, model in enumerate(fleet.names):
            prices[model] = {"input_per_mtok": float(fleet.price_in[j]), "output_per_mtok": float(fleet.price_out[j]),
                             "output_tokens": float(fleet.output_tokens[j])}
        accuracy = generated.outcomes.mean(axis=0)
        record["sets"][name] = {"profile": asdict(profile), "ability": fleet.ability.tolist(),
                                "skill": fleet.skill.tolist(), "specialists": fleet.specialists}
        summary[name] = {"rows": per_set, "models": models,
                         "best_single": fleet.names[int(np.argmax(accuracy))],
                         "accuracy": {m: float(a) for m, a in zip(fleet.names, accuracy, strict=True)}}
    out.mkdir(parents=True, exist_ok=True)
    (out / "models.json").write_text(json.dumps(prices, indent=1) + "\n")
    (out / "generator.json").write_text(json.dumps(record) + "\n")
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="folder to write (created)")
    parser.add_argument("--source", type=Path, default=DEFAULT_DATA_DIR, help="real two-model folder")
    parser.add_argument("--rows", type=int, default=30_000, help="rows in total, split over the profiles")
    parser.add_argument("--models", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profiles", default="premium,specialists,balanced")
    parser.add_argument("--real-sample", type=int, default=0,
                        help="instead: copy this many real rows per two-model set of --source (e.g. 300)")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)


def real_sample(out: Path, source: Path, rows: int, seed: int) -> dict[str, Any]:
    """A smaller folder of the real data (same layout, real outcomes), stratified by topic file."""
    summary: dict[str, Any] = {}
    for name, data in load_folder(source).items():
        rng = np.random.default_rng([seed, len(name)])
        picked = np.sort(rng.permutation(len(data))[: min(rows, len(data))])
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        for gid, topic in enumerate(data.group_names):
            members = [i for i in picked.tolist() if data.groups[i] == gid]
            if not members:
                continue
            with (folder / f"{topic}.csv").open("w", newline="") as fh:
                writer = csv.writer(fh)
                writer.writerow(["prompt", *data.models])
                for i in members:
                    writer.writerow([data.prompts[i], *(str(bool(v)) if v in (0.0, 1.0) else repr(float(v))
                                                        for v in data.correct[i].tolist())])
        summary[name] = {"rows": len(picked), "models": data.k}
    return summary


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.real_sample:
        return {"out": str(args.out), "sets": real_sample(args.out, args.source, args.real_sample, args.seed)}
    profiles = [p for p in args.profiles.split(",") if p]
    unknown = [p for p in profiles if p not in PROFILES]
    if unknown or not profiles:
        raise SystemExit(f"unknown profiles {unknown}; choose from {sorted(PROFILES)}")
    sets = generate_folder(args.out, args.source, args.rows, args.models, args.seed, args.cache_dir, profiles)
    return {"out": str(args.out), "sets": sets}
