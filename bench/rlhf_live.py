"""``flywheel bench rlhf --live``: the live trainer's own iteration on SmolLM2, fused vs unfused.

The ranks, models, schedule search and iteration are exactly ``flywheel trainer``'s
(``workers.trainer.live.LiveTrainer``, default settings unless given): a batch of rewarded
rollouts (answers the live actor sampled to fixed prompts; the rewards are a fixed stand-in,
they change no compute) and live prompts to answer. Each round resets the trainable weights and
runs the unfused then the fused iteration on the same batch and prompts (per-sample samplers), so
both do the same work up to where generated answers end. It reports wall and CPU seconds per
iteration (what one live step costs this machine) and the fused/unfused ratio.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

PROMPTS = (
    "What is the capital city of France?", "Name three fruits that are red.", "What is 12 times 7?",
    "Write a haiku about the sea.", "Explain what a leap year is.", "Give a synonym for 'happy'.",
    "What do bees make?", "How many legs does a spider have?", "Translate 'good morning' into Spanish.",
    "What is the boiling point of water in Celsius?", "Name a planet with rings.", "Why is the sky blue?",
)


def run_live(args: argparse.Namespace) -> dict[str, Any]:
    from core.rlhf.buffer import OffPolicyConfig, Rollout
    from workers.trainer.fusion import GenerateItem, IterationPlan
    from workers.trainer.live import LiveConfig, LiveTrainer

    batch = 4 if args.quick else args.live_batch
    generate = 2 if args.quick else args.live_generate
    repeats = 1 if args.quick else args.live_repeats
    with tempfile.TemporaryDirectory(prefix="rlhf-live-") as tmp:
        cfg = LiveConfig(store_root=Path(tmp), batch_size=batch, generate=generate,
                         max_new_tokens=args.live_max_new_tokens, off_policy=OffPolicyConfig(max_staleness=None))
        t0 = time.perf_counter()
        trainer = LiveTrainer.start(cfg)
        start_s = time.perf_counter() - t0
        try:
            for i, text in enumerate(PROMPTS):
                trainer.add_prompt(f"req-{i}", "bench", f"user-{i % 3}", text)
            pool = list(trainer.prompts.items.values())
            sampled = trainer.cluster.run_iteration(IterationPlan(
                generate=tuple(GenerateItem(i, p.ids, cfg.max_new_tokens) for i, p in enumerate(pool[:batch])),
                eos_ids=trainer.eos_ids, seed=1, schedule=trainer.schedules[True]))
            rollouts = []
            for i, p in enumerate(pool[:batch]):
                tokens, logprobs, _ = sampled.generated[i]
                rollouts.append((Rollout(f"r{i}", p.ids, tuple(tokens), tuple(logprobs), "base", source="trainer"),
                                 1.0 if len(tokens) % 2 else -1.0))
            runs: dict[bool, list[dict[str, float]]] = {False: [], True: []}
            for round_ in range(repeats + 1):  # round 0 warms up
                for fused in (False, True):
                    trainer.cluster.reset()
                    trainer.ref_cache.clear()
                    for r, reward in rollouts:
                        trainer.buffer.add(r, now=0.0)
                        trainer.buffer.add_reward(r.request_id, reward)
                    step = trainer.iterate(now=float(round_), fused=fused)
                    trainer.buffer.pending.clear()
                    if round_:
                        runs[fused].append(step.metrics)
        finally:
            trainer.close()
    summary = {}
    for fused, metrics in runs.items():
        summary["fused" if fused else "unfused"] = {
            k: statistics.median(m[k] for m in metrics)
            for k in ("wall_s", "gen_inference_s", "train_s", "busy_cpu_s", "idle_fraction")
        }
    pairs = [u["wall_s"] / f["wall_s"] for u, f in zip(runs[False], runs[True], strict=True)]
    return {
        "ratio": statistics.median(pairs),
        "ratio_per_round": [round(p, 3) for p in pairs],
        **summary,
        "planning": trainer.planning,
        "start_s": round(start_s, 1),
        "config": {"model": cfg.model, "ranks": cfg.ranks, "threads_per_rank": cfg.threads_per_rank,
                   "batch_size": batch, "generate": generate, "max_new_tokens": cfg.max_new_tokens,
                   "microbatches": cfg.microbatches, "rt": cfg.rt, "repeats": repeats,
                   "date": datetime.date.today().isoformat()},
    }
