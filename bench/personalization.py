"""``flywheel bench personalization``: ASLS vs a fixed update schedule vs a static model.

Protocol (CPU-sized; the candidates are real SmolLM2-135M generations):

1. Prompts are BBC News headlines (``bench.simulated_users``); each gets a pool of 4 real
   SmolLM2 responses spanning short/long x formal/casual (``bench.personalization_pool``,
   generated once, cached under ``.flywheel/cache/personalization``).
2. Each simulated user sends one prompt per event (45 simulated seconds apart, every prompt at
   most once until the pool is used up). The system serves the candidate that the user's
   current adapter ranks highest by per-token log-likelihood under base + adapter (the static
   arm: base alone). The user reacts with real feedback events (rating, regenerate, accept,
   edit, pairwise), which go through the real profile -> signals -> strategy -> LoRA trainer
   path of ``core.personalization`` and ``models.adapters``.
3. Arms, side by side on the same users, prompts and user noise: ``static`` (never updates),
   ``fixed_schedule`` (every k events, fixed lr and steps) and ``asls`` (the adaptive rule).
   Half of the users change their length preference at the midpoint (drift).
4. ``reward[arm][j]`` is the mean hidden utility of the served responses over the ``window``
   events up to ``events[j]``, averaged over users. ``oracle`` (best candidate each time) and
   ``random`` (mean candidate) bracket what ranking can achieve.

Sizes: the default is 2 users x 200 events over 200 prompts; ``--quick`` is 2 users x 100 events
over 100 prompts. Each adapter update costs seconds on CPU. On the busy shared 2-core machine,
``--users 4`` ran for more than 30 min (about 150 updates), so 4 is not the default.

``feedback_to_live_s`` is measured through the real broker, personaliser agent and worker by
``bench.personalization_live`` (also runnable alone as ``flywheel bench personalization-live``),
after the in-process simulation; ``--live-users 0`` skips it. ``update_s`` reports the in-process
part, one adapter update.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.personalization_pool import STYLES, candidate_pool
from bench.simulated_users import Prompt, SimulatedUser, calibrate, make_prompts, make_users
from core.personalization import (
    ASLSConfig,
    ASLSStrategy,
    FixedSchedule,
    FixedScheduleConfig,
    PreferencePair,
    ProfileConfig,
    SftTarget,
    SignalWeights,
    StrategyState,
    UpdatePolicy,
    UserProfile,
    ingest,
    observations_for,
    select_training_batch,
)
from core.personalization.strategy import Observation

log = logging.getLogger(__name__)
MODEL = "smollm2-135m"
DEFAULT_CACHE = Path(".flywheel") / "cache" / "personalization"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="2 users x 100 events (CI-sized)")
    parser.add_argument("--users", type=int, default=None, help="simulated users (default 2; quick 2)")
    parser.add_argument("--events", type=int, default=None, help="events per user (default 200; quick 100)")
    parser.add_argument("--prompts", type=int, default=None, help="prompt pool size (default 200; quick 100)")
    parser.add_argument("--window", type=int, default=None, help="reward window in events (default events/8)")
    parser.add_argument("--fixed-k", type=int, default=10, help="fixed_schedule: update every k events")
    parser.add_argument("--drift-fraction", type=float, default=0.5, help="users whose preference drifts")
    parser.add_argument("--update-budget-s", type=float, default=30.0, help="wall-time bound per update")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--jobs", type=int, default=2,
                        help="processes simulating (arm, user) pairs side by side (each loads the model once)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--adapter-kind", choices=["lora", "comigs"], default="lora",
                        help="per-user adapters trained by the arms: LoRA, or CoMiGS mixtures (the live default)")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--live-users", type=int, default=3,
                        help="users for feedback_to_live_s through the real broker and worker (0: skip)")


@dataclass
class ArmResult:
    rewards: list[float] = field(default_factory=list)
    updates: int = 0
    update_seconds: list[float] = field(default_factory=list)
    steps: int = 0
    stopped_by_time: int = 0
    """Updates cut short by ``--update-budget-s`` (then the result depends on machine load)."""


def feedback_to_live_s(users: int) -> dict[str, Any]:
    """Seconds from publishing a Feedback event to the first InferenceResponse produced with the
    adapter that feedback caused, through the local broker, the personaliser agent and a SmolLM2
    worker (see ``bench.personalization_live``)."""
    if users <= 0:
        return {"p50": None, "p95": None, "note": "skipped (--live-users 0)"}
    from bench.personalization_live import measure

    return asyncio.run(measure(users))


def _percentiles(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "max": None}
    ordered = sorted(values)
    return {"p50": round(statistics.median(ordered), 3),
            "p95": round(ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))], 3),
            "max": round(ordered[-1], 3)}


def _stream(prompts: Sequence[Prompt], n_events: int, user: SimulatedUser) -> list[Prompt]:
    """The user's prompts: fresh permutations of the pool, so a prompt repeats only after all."""
    rng = random.Random(f"prompts:{user.seed}")
    out: list[Prompt] = []
    while len(out) < n_events:
        order = list(prompts)
        rng.shuffle(order)
        out.extend(order)
    return out[:n_events]


def simulate(user: SimulatedUser, policy: UpdatePolicy | None, trainer: Any, stream: Sequence[Prompt],
             pool: dict[str, list[str]], update_budget_s: float) -> ArmResult:
    """One user through one arm. ``policy=None`` is the static arm."""
    weights, profile_cfg = SignalWeights(), ProfileConfig()
    profile, state = UserProfile(user.user_id), StrategyState()
    pairs: list[PreferencePair] = []
    sft: list[SftTarget] = []
    adapter: Path | None = None
    result = ArmResult()
    for i, prompt in enumerate(stream):
        candidates = pool[prompt.prompt_id]
        scores = trainer.score(prompt.text, candidates, adapter)
        order = sorted(range(len(candidates)), key=lambda j: (-scores[j], j))
        reaction = user.react(i, prompt, [candidates[j] for j in order])
        result.rewards.append(reaction.served_utility)
        if policy is None:
            continue
        score_of = dict(zip(candidates, scores, strict=True))
        observations: list[Observation] = []
        for event in reaction.events:
            profile, signals = ingest(profile, event, weights, profile_cfg)
            pairs.extend(signals.pairs)
            sft.extend(signals.sft)
            margins = {p.seq: score_of[p.chosen] - score_of[p.rejected] for p in signals.pairs
                       if p.chosen in score_of and p.rejected in score_of}
            observations += observations_for(
                event, signals, margins,
                produced_by_current_adapter=event.response.request_id in reaction.served_by_adapter)
        now = reaction.events[-1].event_time_s
        state = policy.observe(state, now, observations)
        decision = policy.decide(state, now)
        if not decision.update:
            continue
        batch = select_training_batch(pairs, sft, last_trained_seq=state.last_trained_seq,
                                      replay_fraction=decision.replay_fraction, now_s=now,
                                      seed=hash((user.seed, i)) & 0xFFFF)
        update = trainer.update(user.user_id, batch.pairs, batch.sft, adapter, lr=decision.lr,
                                steps=decision.steps, time_budget_s=update_budget_s)
        adapter = update.path
        state = policy.committed(state, now, batch.trained_upto_seq)
        result.updates += 1
        result.steps += int(update.metrics["steps"])
        result.stopped_by_time += int(update.metrics["stopped_by_time"])
        result.update_seconds.append(update.metrics["seconds"])
        log.debug("%s %s event %d: %s lr=%.4f steps=%d agree=%.2f drift=%.2f", user.user_id, policy.name, i,
                  decision.reason, decision.lr, decision.steps, decision.agreement, decision.drift)
    return result


def _curve(per_user: Sequence[Sequence[float]], checkpoints: Sequence[int], window: int) -> list[float]:
    out = []
    for e in checkpoints:
        means = [statistics.fmean(r[max(0, e - window):e]) for r in per_user]
        out.append(round(statistics.fmean(means), 4))
    return out


def _trainer(model: Any, tokenizer: Any, store: Path, cache_dir: Path, kind: str = "lora") -> Any:
    """The benchmark's adapter trainer (a LoRA, or a CoMiGS mixture: the live default), with the
    base-model caches loaded from ``cache_dir``."""
    from models.adapters import AdapterConfig, AdapterTrainer

    loss = AdapterConfig(base_model_name=MODEL, train_bf16=True)
    if kind == "comigs":
        from models.adapters.mixture_trainer import MixtureConfig, MixtureTrainer

        trainer: Any = MixtureTrainer(model, tokenizer, MixtureConfig(loss=loss), store)
    else:
        trainer = AdapterTrainer(model, tokenizer, loss, store)
    trainer.load_caches(_cache_file(cache_dir, trainer))
    return trainer


def _cache_file(cache_dir: Path, trainer: Any) -> Path:
    return cache_dir / f"trunk-{MODEL}-{trainer.scorer.split}.pt"


_WORKER: dict[str, Any] = {}
"""Per worker process: its own model and trainer (``--jobs`` > 1; spawned, so nothing is shared)."""


def _worker_init(threads: int, store: str, cache_dir: str, kind: str = "lora") -> None:
    import torch

    from models.loader import load_model

    torch.set_num_threads(threads)
    lm = load_model(MODEL)
    _WORKER["trainer"] = _trainer(lm.model, lm.tokenizer, Path(store), Path(cache_dir), kind)


def _worker_simulate(user: SimulatedUser, policy: UpdatePolicy, stream: Sequence[Prompt],
                     pool: dict[str, list[str]], update_budget_s: float) -> ArmResult:
    return simulate(user, policy, _WORKER["trainer"], stream, pool, update_budget_s)


def _run_arms(args: argparse.Namespace, policies: dict[str, UpdatePolicy], users: Sequence[SimulatedUser],
              streams: Sequence[Sequence[Prompt]], pool: dict[str, list[str]], trainer: Any, store: Path,
              seconds: dict[str, float]) -> dict[str, list[ArmResult]]:
    """Every (arm, user) simulation; they are independent, so ``--jobs`` processes run them side by
    side (results are identical to a sequential run: each simulation is deterministic)."""
    tasks = [(name, k) for name in policies for k in range(len(users))]
    out: dict[tuple[str, int], ArmResult] = {}
    t = time.perf_counter()
    if args.jobs <= 1:
        for name, k in tasks:
            t_arm = time.perf_counter()
            out[name, k] = simulate(users[k], policies[name], trainer, streams[k], pool, args.update_budget_s)
            seconds[name] = round(seconds.get(name, 0.0) + time.perf_counter() - t_arm, 1)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_worker_init,
                                 initargs=(args.threads, str(store), str(args.cache_dir), args.adapter_kind)) as ex:
            futures = {task: ex.submit(_worker_simulate, users[task[1]], policies[task[0]], streams[task[1]],
                                       pool, args.update_budget_s) for task in tasks}
            for task, future in futures.items():
                out[task] = future.result()
    seconds["arms_wall"] = round(time.perf_counter() - t, 1)
    for (name, k), r in sorted(out.items()):
        log.info("%s %s: reward %.3f, %d updates", name, users[k].user_id,
                 statistics.fmean(r.rewards[-max(1, len(r.rewards) // 8):]), r.updates)
    return {name: [out[name, k] for k in range(len(users))] for name in policies}


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    n_users = args.users or 2
    n_events = args.events or (100 if args.quick else 200)
    n_prompts = args.prompts or (100 if args.quick else 200)
    window = args.window or max(5, n_events // 8)
    checkpoints = [n_events // 4, n_events // 2, n_events]
    prompts = make_prompts(n_prompts, seed=args.seed)
    users = make_users(n_users, seed=args.seed, drift_fraction=args.drift_fraction, drift_at=n_events // 2)
    loaded: dict[str, Any] = {}

    def load() -> tuple[Any, Any]:
        if "model" not in loaded:
            from models.loader import load_model

            t = time.perf_counter()
            lm = load_model(MODEL)
            loaded.update(model=lm.model, tokenizer=lm.tokenizer, seconds=time.perf_counter() - t)
        return loaded["model"], loaded["tokenizer"]

    t = time.perf_counter()
    pool = candidate_pool(prompts, load, args.cache_dir, MODEL, seed=args.seed)
    pool_s = time.perf_counter() - t
    every_text = [text for p in prompts for text in pool[p.prompt_id]]
    users = [calibrate(u, every_text) for u in users]
    streams = [_stream(prompts, n_events, u) for u in users]
    model, tokenizer = load()
    seconds: dict[str, float] = {"pool": round(pool_s, 1), "model_load": round(loaded["seconds"], 1)}
    asls_config = ASLSConfig()
    with tempfile.TemporaryDirectory(prefix="flywheel-adapters-") as store:
        trainer = _trainer(model, tokenizer, Path(store), args.cache_dir, args.adapter_kind)
        t = time.perf_counter()
        for p in prompts:  # base scores of every candidate: the static ranking and the DPO reference
            trainer.score(p.text, pool[p.prompt_id], None)
        trainer.save_caches(_cache_file(args.cache_dir, trainer))
        seconds["base_scoring"] = round(time.perf_counter() - t, 1)
        t = time.perf_counter()
        results: dict[str, list[ArmResult]] = {
            "static": [simulate(u, None, trainer, s, pool, args.update_budget_s)
                       for u, s in zip(users, streams, strict=True)]}
        seconds["static"] = round(time.perf_counter() - t, 1)
        policies: dict[str, UpdatePolicy] = {
            # same learning rate as ASLS at neutral agreement: only *when* and *how much* differ
            "fixed_schedule": FixedSchedule(FixedScheduleConfig(every_k_events=args.fixed_k,
                                                                lr=asls_config.base_lr)),
            "asls": ASLSStrategy(asls_config),
        }
        results.update(_run_arms(args, policies, users, streams, pool, trainer, Path(store), seconds))
    oracle = [[max(u.utility(c, i) for c in pool[p.prompt_id]) for i, p in enumerate(s)]
              for u, s in zip(users, streams, strict=True)]
    mean_c = [[statistics.fmean(u.utility(c, i) for c in pool[p.prompt_id]) for i, p in enumerate(s)]
              for u, s in zip(users, streams, strict=True)]
    reward = {name: _curve([r.rewards for r in res], checkpoints, window) for name, res in results.items()}
    updates = {name: sum(r.updates for r in res) for name, res in results.items() if name != "static"}
    asls, static, fixed = reward["asls"], reward["static"], reward["fixed_schedule"]
    seconds["total"] = round(time.perf_counter() - started, 1)
    return {
        "users": n_users,
        "events": checkpoints,
        "reward": {"asls": asls, "static": static, "fixed_schedule": fixed},
        "updates": {"asls": updates["asls"], "fixed_schedule": updates["fixed_schedule"]},
        "feedback_to_live_s": feedback_to_live_s(args.live_users),
        "ratios": {
            "asls_vs_static": [round(a / s, 3) for a, s in zip(asls, static, strict=True)],
            "asls_vs_fixed_schedule": [round(a / f, 3) for a, f in zip(asls, fixed, strict=True)],
            "updates_asls_vs_fixed_schedule": round(updates["asls"] / max(1, updates["fixed_schedule"]), 3),
        },
        "targets": {
            "asls_ge_1.2x_static": asls[-1] >= 1.2 * static[-1],
            "asls_ge_fixed_schedule": asls[-1] >= fixed[-1],
            "asls_fewer_updates": updates["asls"] < updates["fixed_schedule"],
        },
        "bounds": {"oracle": _curve(oracle, checkpoints, window), "random": _curve(mean_c, checkpoints, window)},
        "update_s": {name: _percentiles([s for r in res for s in r.update_seconds])
                     for name, res in results.items() if name != "static"},
        "steps": {name: sum(r.steps for r in res) for name, res in results.items() if name != "static"},
        "stopped_by_time": {name: sum(r.stopped_by_time for r in res) for name, res in results.items()
                            if name != "static"},
        "per_user": {
            u.user_id: {
                "preference": f"{u.preference.length}/{u.preference.style}/{u.preference.topic}"
                              + (f" -> {u.drift_to.length} at {u.drift_at}" if u.drift_to else ""),
                **{name: round(statistics.fmean(results[name][k].rewards[-window:]), 4) for name in results},
                "updates": {name: results[name][k].updates for name in policies},
            } for k, u in enumerate(users)
        },
        "setup": {"model": MODEL, "prompts": n_prompts, "candidates_per_prompt": len(STYLES), "window": window,
                  "fixed_k": args.fixed_k, "fixed_lr": asls_config.base_lr, "fixed_steps": FixedScheduleConfig().steps,
                  "drift_users": sum(u.drift_to is not None for u in users),
                  "drift_at": n_events // 2, "update_budget_s": args.update_budget_s, "threads": args.threads,
                  "jobs": args.jobs, "adapter_kind": args.adapter_kind},
        "seconds": seconds,
    }
