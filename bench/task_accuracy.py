"""``flywheel bench tasks``: per-topic accuracy of each catalogued model on a task set, per prompt format.

Every (model, prompt format) pair answers every task of the set through the live serving path —
``models.prompting`` renders the prompt, ``workers.serving.ServingLoop`` over the torch engine
generates greedily (the same code a worker runs) — and ``bench.tasks`` checks the answer. Output
per pair: accuracy per topic and overall, mean output tokens, and the mean cost of a request at the
catalogue's prices. The catalogued format of each model (``ModelSpec.prompt_format``) is the one
this measurement supports (docs/MODELS.md).

Greedy decoding makes the figures deterministic for a given task set, model and format; no seeds
are involved, and batching does not change a greedy answer beyond float round-off.
"""

from __future__ import annotations

import argparse
import random
from collections import defaultdict
from pathlib import Path
from typing import Any

from bench.tasks import Task, load_tasks, topics
from core.catalog import CATALOG, get_model

DEFAULT_TASKS = Path(__file__).resolve().parent.parent / "data" / "tasks" / "default"
FORMATS = ("chat", "completion")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tasks", type=Path, default=DEFAULT_TASKS, help="folder of task JSONL files")
    parser.add_argument("--models", default=",".join(CATALOG), help="comma-separated catalogue names")
    parser.add_argument("--formats", default=",".join(FORMATS), help="prompt formats to compare")
    parser.add_argument("--max-tokens", type=int, default=32, help="output budget per answer")
    parser.add_argument("--per-topic", type=int, default=0,
                        help="at most this many tasks per topic (0: all), drawn with --seed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--show", type=int, default=0, help="include this many sample answers per topic")


def sample_tasks(tasks: list[Task], per_topic: int, seed: int) -> list[Task]:
    if per_topic <= 0:
        return tasks
    by_topic: dict[str, list[Task]] = defaultdict(list)
    for t in tasks:
        by_topic[t.topic].append(t)
    rng = random.Random(seed)
    out: list[Task] = []
    for topic in sorted(by_topic):
        chosen = list(by_topic[topic])
        rng.shuffle(chosen)
        out += chosen[:per_topic]
    return out


def answer_all(model: str, fmt: str, tasks: list[Task], max_tokens: int) -> list[tuple[str, int, int]]:
    """(text, prompt tokens, output tokens) per task, in order, through ServingLoop + TorchEngine."""
    from models.prompting import prompt_ids
    from workers.engines.base import SamplingParams
    from workers.engines.torch_engine import TorchEngine
    from workers.serving import FinalEvent, ServeRequest, ServingLoop

    spec = get_model(model)
    engine = TorchEngine.from_catalog(model)
    loop = ServingLoop(engine)
    for i, task in enumerate(tasks):
        ids, stops = prompt_ids(spec, engine.tokenizer, [{"role": "user", "content": task.prompt}], fmt)
        loop.admit(ServeRequest(str(i), task.prompt, SamplingParams(max_tokens=max_tokens, stop=stops),
                                prompt_ids=ids))
    finals: dict[str, FinalEvent] = {}
    while len(finals) < len(tasks):
        for event in loop.step():
            if isinstance(event, FinalEvent):
                finals[event.request_id] = event
    return [(finals[str(i)].text, finals[str(i)].prompt_tokens, finals[str(i)].output_tokens)
            for i in range(len(tasks))]


def score(model: str, tasks: list[Task], answers: list[tuple[str, int, int]], show: int) -> dict[str, Any]:
    spec = get_model(model)
    right: dict[str, list[bool]] = defaultdict(list)
    samples: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for task, (text, _, _) in zip(tasks, answers, strict=True):
        ok = task.is_correct(text)
        right[task.topic].append(ok)
        if len(samples[task.topic]) < show:
            samples[task.topic].append({"prompt": task.prompt, "answer": task.answer, "response": text, "ok": ok})
    costs = [spec.cost(p, o) for _, p, o in answers]
    out: dict[str, Any] = {
        "accuracy": {t: round(sum(v) / len(v), 4) for t, v in sorted(right.items())},
        "overall": round(sum(sum(v) for v in right.values()) / len(tasks), 4),
        "mean_output_tokens": round(sum(o for _, _, o in answers) / len(answers), 2),
        "cost_per_request_usd": sum(costs) / len(costs),
    }
    if show:
        out["samples"] = dict(samples)
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    tasks = sample_tasks(load_tasks(args.tasks), args.per_topic, args.seed)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    results: dict[str, dict[str, Any]] = {}
    for model in models:
        results[model] = {}
        for fmt in formats:
            answers = answer_all(model, fmt, tasks, args.max_tokens)
            results[model][fmt] = score(model, tasks, answers, args.show)
    best = {t: max(((m, f) for m in models for f in formats),
                   key=lambda mf: results[mf[0]][mf[1]]["accuracy"][t])
            for t in topics(tasks)}
    return {
        "tasks": len(tasks),
        "topics": topics(tasks),
        "max_tokens": args.max_tokens,
        "catalogued_format": {m: get_model(m).prompt_format for m in models},
        "results": results,
        "best_per_topic": {t: {"model": m, "format": f, "accuracy": results[m][f]["accuracy"][t]}
                           for t, (m, f) in best.items()},
    }
