"""The live trainer's iteration: rewarded rollouts + live prompts in, one fused PPO step out.

``flywheel trainer`` runs every PPO iteration through the RLHFuse runtime
(``workers.trainer.fusion``) on ``ranks`` gloo processes (NCCL where CUDA is present is a
backend swap in ``workers.trainer.distributed``; the ranks here are CPU processes):

1. **Batch**: the oldest ``batch_size`` rewarded rollouts from the ``RolloutBuffer`` (workers'
   live rollouts and the trainer's own earlier samples, joined with Reward events; off-policy
   rules in ``core.rlhf.buffer``);
2. **Generation with inter-stage fusion**: ``generate`` prompts sampled from the live request
   stream are answered by the current actor (temperature 1, stopping at the end-of-turn token or
   ``max_new_tokens``) while free ranks already compute the batch's reference log-probs and
   critic values and the finished samples' reference log-probs; the tail migrates at ``rt``;
3. **Training with intra-stage fusion**: actor and critic run through the annealed fused
   pipeline schedule (searched once at start-up from stage times profiled on the real models);
   the PPO ratio's denominator is each rollout's behaviour log-probs;
4. **Publish**: rank 0 stores the checkpoint; the generated samples become Rollouts
   (``source = "trainer"``, the pre-update version) for the rewarder to score. They train in a
   later iteration once rewarded, with the reference log-probs computed here (cached).

The trainer never scores a rollout itself: with no reward, a rollout expires and is counted.
CPU bound per iteration: ``ranks x threads_per_rank`` cores for roughly the time of
``batch_size`` reference + actor + critic passes and ``generate x max_new_tokens`` decode steps
(``docs/TRAINING.md`` has measured figures); ``min_interval_s`` caps the duty cycle.
"""

from __future__ import annotations

import hashlib
import logging
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.rlhf.anneal import AnnealConfig, anneal_schedule
from core.rlhf.buffer import OffPolicyConfig, Rollout, RolloutBuffer
from core.rlhf.pipeline import Schedule, sequential_schedule
from core.rlhf.ppo import PPOConfig
from workers.trainer.checkpoint import CheckpointMeta
from workers.trainer.fusion import FusionCluster, GenerateItem, GivenSample, IterationPlan
from workers.trainer.fusion_plan import build_problem
from workers.trainer.models import ModelSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LiveConfig:
    """Shape and cost of one live iteration (defaults fit 2 shared CPU cores)."""

    store_root: Path
    """Where checkpoints are stored, content-addressed."""
    model: str = "smollm2-135m"
    ranks: int = 2
    """Rank processes (pipeline depth and generation instances)."""
    threads_per_rank: int = 1
    batch_size: int = 8
    """Rewarded rollouts per PPO iteration."""
    minibatches: int = 1
    microbatches: int = 2
    """Pipeline micro-batches per mini-batch."""
    epochs: int = 1
    generate: int = 4
    """Live prompts answered per iteration (their samples train later, once rewarded)."""
    max_new_tokens: int = 48
    max_prompt_tokens: int = 192
    fused: bool = True
    """False: the unfused baseline (generation barrier, sequential 1F1B)."""
    rt: float = 0.2
    inference_microbatch: int = 2
    actor_lr: float = 5e-5
    critic_lr: float = 1e-4
    anneal_iterations: int = 3000
    min_interval_s: float = 0.0
    """Seconds between the starts of two iterations (bounds the trainer's share of the CPU)."""
    seed: int = 0
    prompt_pool: int = 512
    """Distinct recent prompts kept to sample generation prompts from."""
    ppo: PPOConfig = field(default_factory=PPOConfig)
    off_policy: OffPolicyConfig = field(default_factory=OffPolicyConfig)

    def __post_init__(self) -> None:
        if self.ranks < 1 or self.threads_per_rank < 1:
            raise ValueError(f"ranks and threads_per_rank must be >= 1, got {self.ranks}, {self.threads_per_rank}")
        if self.batch_size < self.minibatches * 1 or self.batch_size % self.minibatches:
            raise ValueError(f"batch_size {self.batch_size} must split into {self.minibatches} mini-batches")
        if not 1 <= self.microbatches <= self.batch_size // self.minibatches:
            raise ValueError(
                f"microbatches {self.microbatches} must be within 1..{self.batch_size // self.minibatches}"
            )
        if self.generate < 0 or self.max_new_tokens < 1 or self.epochs < 1:
            raise ValueError(
                f"need generate >= 0, max_new_tokens >= 1, epochs >= 1; got {self.generate}, "
                f"{self.max_new_tokens}, {self.epochs}"
            )
        if not 0.0 <= self.rt <= 1.0 or self.min_interval_s < 0:
            raise ValueError(f"need 0 <= rt <= 1 and min_interval_s >= 0, got {self.rt}, {self.min_interval_s}")


@dataclass(frozen=True)
class LivePrompt:
    """A prompt seen on the request stream, tokenised the way workers tokenise it."""

    request_id: str
    tenant_id: str
    user_id: str
    text: str
    ids: tuple[int, ...]


@dataclass(frozen=True)
class GeneratedRollout:
    """A sample the trainer generated, to publish as a Rollout (``source = "trainer"``)."""

    request_id: str
    prompt: LivePrompt
    tokens: tuple[int, ...]
    logprobs: tuple[float, ...]
    text: str
    model_version: str


@dataclass(frozen=True)
class LiveStep:
    version: str
    parent_version: str
    step: int
    checkpoint_dir: Path
    digest: str
    metrics: dict[str, float]
    generated: tuple[GeneratedRollout, ...]
    trained: tuple[str, ...]
    """Request ids of the rollouts this step trained on."""


class PromptPool:
    """The most recent distinct prompts (bounded), sampled without replacement per iteration."""

    def __init__(self, capacity: int, seed: int) -> None:
        self.capacity = capacity
        self.items: OrderedDict[str, LivePrompt] = OrderedDict()
        self.rng = random.Random(seed)

    def add(self, prompt: LivePrompt) -> None:
        self.items.pop(prompt.text, None)
        self.items[prompt.text] = prompt
        while len(self.items) > self.capacity:
            self.items.popitem(last=False)

    def sample(self, n: int) -> list[LivePrompt]:
        pool = list(self.items.values())
        return self.rng.sample(pool, min(n, len(pool)))

    def __len__(self) -> int:
        return len(self.items)


def default_cuts(spec: ModelSpec, ranks: int) -> tuple[tuple[int, ...] | None, tuple[int, ...] | None]:
    """Two ranks: the actor splits below its first LoRA layer (stage 0 is a frozen trunk, no
    backward), the critic below its first trainable layer; more ranks: balanced by layer count."""
    if ranks != 2 or spec.kind != "smollm2":
        return None, None
    return (min(spec.lora_layers),), (spec.critic_layers - spec.critic_trainable_layers,)


class LiveTrainer:
    """Buffers events, runs live iterations on a ``FusionCluster``; blocking (call from a thread)."""

    def __init__(self, cfg: LiveConfig, cluster: FusionCluster, tokenizer: Any, spec: ModelSpec,
                 eos_ids: frozenset[int], base_model: str) -> None:
        from models.adapters.trunk import ChatEncoder

        self.cfg = cfg
        self.cluster = cluster
        self.tokenizer = tokenizer
        self.spec = spec
        self.encoder = ChatEncoder(tokenizer, cfg.max_prompt_tokens, cfg.max_new_tokens)
        self.eos_ids = eos_ids
        self.base_model = base_model
        self.buffer = RolloutBuffer(cfg.off_policy)
        self.prompts = PromptPool(cfg.prompt_pool, cfg.seed)
        self.ref_cache: OrderedDict[str, tuple[float, ...]] = OrderedDict()
        self.step = 0
        self._lock = threading.Lock()
        """Guards the tokenizer and the prompt pool: the event loop adds prompts while an
        iteration runs in a worker thread (fast tokenizers must not be used concurrently)."""
        self.schedules: dict[bool, Schedule] = {}
        """The fused (annealed) and unfused (sequential 1F1B) training schedules."""
        self.planning: dict[str, float] = {}
        self.last_started = -float("inf")

    @classmethod
    def start(cls, cfg: LiveConfig, spec: ModelSpec | None = None, *, tokenizer: Any = None,
              start_method: str = "spawn") -> LiveTrainer:
        """Start the ranks (each loads the models), load the tokenizer, plan the fused schedule.

        ``spec`` defaults to SmolLM2 with its catalogued tokenizer; tests pass tiny models and a
        tokenizer of their own."""
        spec = spec or ModelSpec(kind="smollm2", seed=cfg.seed)
        actor_cuts, critic_cuts = default_cuts(spec, cfg.ranks)
        tokenizer, eos_ids, base_model = _tokenizer(spec, cfg.model, tokenizer)
        cluster = FusionCluster(spec, cfg.ranks, ppo=cfg.ppo, actor_lr=cfg.actor_lr, critic_lr=cfg.critic_lr,
                                actor_cuts=actor_cuts, critic_cuts=critic_cuts, threads=cfg.threads_per_rank,
                                pin=False, start_method=start_method)
        try:
            trainer = cls(cfg, cluster, tokenizer, spec, eos_ids, base_model)
            trainer.plan()
        except BaseException:
            cluster.close()
            raise
        return trainer

    def close(self) -> None:
        self.cluster.close()

    # ------------------------------------------------------------------ planning

    def plan(self) -> None:
        """Profile the stages on a typical micro-batch and search the fused schedule (once)."""
        cfg = self.cfg
        t0 = time.perf_counter()
        rows = max(1, cfg.batch_size // (cfg.minibatches * cfg.microbatches))
        length = min(cfg.max_prompt_tokens, 64) + cfg.max_new_tokens
        vocab = int(self.spec.tiny.get("vocab_size", 256)) if self.spec.kind == "tiny" else 32_000
        times = self.cluster.profile(rows, length, vocab)
        problem = build_problem(cfg.microbatches, times, unit_s=1e-3)
        self.schedules[False] = sequential_schedule(problem)
        result = anneal_schedule(problem, AnnealConfig(iterations=cfg.anneal_iterations,
                                                       memory_iterations=cfg.anneal_iterations // 4,
                                                       restarts=1, seed=cfg.seed))
        self.schedules[True] = result.schedule
        self.planning = {"sim_fused_ms": float(result.timeline.makespan),
                         "sim_unfused_ms": float(result.initial.makespan),
                         "planning_s": time.perf_counter() - t0}
        log.info("fused schedule planned in %.1fs: %s", self.planning["planning_s"],
                 {k: round(v, 1) for k, v in self.planning.items()})

    # ------------------------------------------------------------------ state

    @property
    def version(self) -> str:
        return self.buffer.version

    def resume(self, checkpoint_dir: Path, step: int) -> None:
        """Continue from a published checkpoint (versions are ``v1 .. v<step>``)."""
        self.cluster.load(checkpoint_dir)
        self.step = step
        self.buffer.restore_versions(["base", *(f"v{i}" for i in range(1, step + 1))])

    def add_prompt(self, request_id: str, tenant_id: str, user_id: str, text: str) -> None:
        if not text.strip():
            return
        with self._lock:
            ids = tuple(self.encoder.encode_prompt(text)[-self.cfg.max_prompt_tokens:])
            self.prompts.add(LivePrompt(request_id, tenant_id, user_id, text, ids))

    def ready(self, now: float) -> bool:
        self.buffer.drop_stale()
        due = now - self.last_started >= self.cfg.min_interval_s
        return due and self.buffer.n_ready() >= self.cfg.batch_size

    # ------------------------------------------------------------------ one iteration

    def iterate(self, now: float, fused: bool | None = None) -> LiveStep:
        """One iteration (``fused`` overrides the configuration: the benchmark runs both)."""
        cfg = self.cfg
        fused = cfg.fused if fused is None else fused
        self.last_started = now
        taken = self.buffer.take(cfg.batch_size)
        with self._lock:
            prompts = self.prompts.sample(cfg.generate)
        given = tuple(
            GivenSample(i, r.prompt_token_ids, r.response_token_ids, r.response_logprobs, reward,
                        self.ref_cache.pop(r.request_id, None))
            for i, (r, reward) in enumerate(taken)
        )
        offset = len(given)
        items = tuple(GenerateItem(offset + j, p.ids, cfg.max_new_tokens) for j, p in enumerate(prompts))
        plan = IterationPlan(
            generate=items,
            given=given,
            fused=fused,
            rt=cfg.rt,
            inference_microbatch=cfg.inference_microbatch,
            eos_ids=self.eos_ids,
            seed=cfg.seed * 1_000_003 + self.step,
            n_minibatches=cfg.minibatches,
            n_microbatches=cfg.microbatches,
            epochs=cfg.epochs,
            schedule=self.schedules[fused],
        )
        report = self.cluster.run_iteration(plan)
        parent = self.version
        self.step += 1
        version = f"v{self.step}"
        digest, path = self.cluster.export(cfg.store_root, CheckpointMeta(self.base_model, version, self.step))
        generated = []
        for j, prompt in enumerate(prompts):
            tokens, logprobs, ref = report.generated[offset + j]
            rid = _trainer_request_id(parent, prompt.request_id, j)
            self.ref_cache[rid] = tuple(ref)
            with self._lock:
                text = str(self.tokenizer.decode(tokens, skip_special_tokens=True))
            generated.append(GeneratedRollout(rid, prompt, tuple(tokens), tuple(logprobs), text, parent))
        while len(self.ref_cache) > 4096:
            self.ref_cache.popitem(last=False)
        self.buffer.published(version)
        metrics = {**report.metrics, "wall_s": report.wall_s, "gen_inference_s": report.gen_inference_s,
                   "train_s": report.train_s, "idle_fraction": report.idle_fraction,
                   "busy_cpu_s": sum(report.busy_cpu_s), "generated": float(len(generated)),
                   "fused": float(fused), "ranks": float(cfg.ranks),
                   "migrated": float(report.migration_at_s is not None),
                   **{k: float(v) for k, v in self.buffer.counters.items()}}
        return LiveStep(version, parent, self.step, path, digest, metrics, tuple(generated),
                        tuple(r.request_id for r, _ in taken))


def _trainer_request_id(version: str, source_request: str, index: int) -> str:
    return "trainer-" + hashlib.sha256(f"{version}:{source_request}:{index}".encode()).hexdigest()[:24]


def _tokenizer(spec: ModelSpec, model: str, given: Any) -> tuple[Any, frozenset[int], str]:
    """The tokenizer the ranks' models use, its end-of-turn ids and the base model's name."""
    from models.adapters.trunk import END_OF_TURN_TOKENS

    if given is not None:
        tokenizer = given
    elif spec.kind == "tiny":
        raise ValueError("tiny models need a tokenizer passed in")
    else:
        from transformers import AutoTokenizer

        from models.loader import converted_dir

        tokenizer = AutoTokenizer.from_pretrained(str(converted_dir(model)))
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
    get_vocab = getattr(tokenizer, "get_vocab", None)
    vocab = get_vocab() if callable(get_vocab) else {}
    ends = {int(vocab[t]) for t in END_OF_TURN_TOKENS if t in vocab}
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ends.add(int(tokenizer.eos_token_id))
    return tokenizer, frozenset(ends), "tiny-llama" if spec.kind == "tiny" else model


def rollouts_of(step: LiveStep) -> Sequence[Rollout]:
    """The generated samples as buffer rollouts (what the trainer reads back from the topic)."""
    return [Rollout(g.request_id, g.prompt.ids, g.tokens, g.logprobs, g.model_version, prompt=g.prompt.text,
                    response=g.text, user_id=g.prompt.user_id, source="trainer") for g in step.generated]
