"""Measure a real engine's iteration latency and fit the simulator's ``StepCostModel``.

Decode steps are timed at batch sizes 1..32 and two KV window widths (one long row sets the
window, the other rows are short), prefills at several (prompts x length) shapes, and the serving
loop's own per-iteration overhead with a short run through ``ServingLoop``. Sizes are swept up
and then down so that slow drift on a shared machine lands on every size alike; each point is
the median of its steps. The fit is cached (JSON) per model, device, thread count and torch
version, and a cached fit is re-used only after a short probe agrees with it.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from core.scheduling.cost import StepCostModel, fit_step_cost
from workers.engines.base import Engine, EngineRequest, SamplingParams, TokenOutput
from workers.serving import ServeRequest, ServingConfig, ServingLoop

FULL_BATCHES = (1, 2, 4, 8, 12, 16, 24, 32)
QUICK_BATCHES = (1, 4, 16, 32)
PREFILL_SHAPES = ((1, 32), (1, 128), (1, 256), (2, 128), (4, 128), (8, 128), (4, 32))


class TimedEngine(Engine):
    """Delegates to an engine and records every iteration's shape and wall time."""

    def __init__(self, inner: Engine) -> None:
        self.inner = inner
        self.model_name = inner.model_name
        self._ctx: dict[str, int] = {}
        self._prompt_len: dict[str, int] = {}
        self._recompute: dict[str, int] = {}  # preempted rows: tokens their re-prefill covers
        self.log: list[tuple[int, int, int, int, float]] = []
        """(decode rows, decode window, prefill rows, longest joining prompt, seconds) per execute."""

    def encode_prompt(self, prompt: str, chat: bool = True) -> list[int]:
        return self.inner.encode_prompt(prompt, chat)

    def submit(self, request: EngineRequest) -> None:
        self._prompt_len[request.request_id] = len(request.prompt_ids)
        self.inner.submit(request)

    def execute(self, batch: Sequence[str]) -> dict[str, TokenOutput]:
        joining = [r for r in batch if r not in self._ctx]
        prefill = {r: self._recompute.pop(r, self._prompt_len[r]) for r in joining}
        window = max((self._ctx[r] for r in batch if r in self._ctx), default=0)
        t0 = time.perf_counter()
        out = self.inner.execute(batch)
        dt = time.perf_counter() - t0
        for r in joining:
            self._ctx[r] = prefill[r]
        for r in batch:  # every row, padding included, adds one token to its cache
            self._ctx[r] += 1
        self.log.append((len(batch) - len(joining), window, len(joining), max(prefill.values(), default=0), dt))
        return out

    def release(self, request_id: str) -> None:
        self._ctx.pop(request_id, None)
        self._prompt_len.pop(request_id, None)
        self._recompute.pop(request_id, None)
        self.inner.release(request_id)

    @property
    def supports_preemption(self) -> bool:
        return self.inner.supports_preemption

    @property
    def supports_swap(self) -> bool:
        return self.inner.supports_swap

    def preempt(self, request_id: str, swap: bool = False) -> None:
        self.inner.preempt(request_id, swap)
        if not swap and request_id in self._ctx:  # recompute: it joins again with a prefill of its context
            self._recompute[request_id] = self._ctx.pop(request_id)

    @property
    def kv_bytes_per_token(self) -> int | None:
        return self.inner.kv_bytes_per_token

    @property
    def device_name(self) -> str:
        return self.inner.device_name

    def load_adapter(self, adapter_hash: str, path: str) -> None:
        self.inner.load_adapter(adapter_hash, path)

    def unload_adapter(self, adapter_hash: str) -> None:
        self.inner.unload_adapter(adapter_hash)

    def load_checkpoint(self, version: str, path: str) -> None:
        self.inner.load_checkpoint(version, path)

    @property
    def model_version(self) -> str:
        return self.inner.model_version

    @property
    def adapters(self) -> tuple[str, ...]:
        return self.inner.adapters

    @property
    def active(self) -> tuple[str, ...]:
        return self.inner.active


_LONG = SamplingParams(max_tokens=100_000, ignore_eos=True)


def _ids(n: int, salt: int) -> tuple[int, ...]:
    return tuple(100 + (salt * 7919 + i * 31) % 20000 for i in range(n))


def decode_samples(engine: Engine, batch: int, window: int, steps: int) -> list[tuple[int, int, float]]:
    """Time ``steps`` decode iterations of ``batch`` rows whose longest context is about ``window``."""
    rids = [f"cal-{batch}-{window}-{i}" for i in range(batch)]
    engine.submit(EngineRequest(rids[0], _ids(window, 1), _LONG))
    engine.execute(rids[:1])
    for i, rid in enumerate(rids[1:]):
        engine.submit(EngineRequest(rid, _ids(16, i + 2), _LONG))
    engine.execute(rids)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        engine.execute(rids)
        times.append(time.perf_counter() - t0)
    for rid in rids:
        engine.release(rid)
    ctx = window + 1 + steps // 2
    return [(batch, ctx, statistics.median(times))]


def prefill_sample(engine: Engine, rows: int, length: int) -> tuple[int, int, float]:
    rids = [f"pre-{rows}-{length}-{i}" for i in range(rows)]
    for i, rid in enumerate(rids):
        engine.submit(EngineRequest(rid, _ids(length, i), _LONG))
    t0 = time.perf_counter()
    engine.execute(rids)
    dt = time.perf_counter() - t0
    for rid in rids:
        engine.release(rid)
    return rows, length, dt


def loop_overhead_s(engine: Engine, requests: int = 8, tokens: int = 12) -> float:
    """Per-iteration time the serving loop spends outside ``engine.execute``."""
    timed = TimedEngine(engine)
    loop = ServingLoop(timed, config=ServingConfig(policy="fcfs_continuous", learn_online=False, online_cost=None))
    for i in range(requests):
        loop.admit(
            ServeRequest(
                f"ovh-{i}",
                "calibration",
                SamplingParams(max_tokens=tokens, ignore_eos=True),
                prompt_ids=_ids(24, i),
            )
        )
    walls = []
    while loop.has_work():
        t0 = time.perf_counter()
        loop.step()
        walls.append(time.perf_counter() - t0)
    inside = [e[-1] for e in timed.log]
    return max(statistics.median(w - i for w, i in zip(walls, inside, strict=True)), 0.0)


def calibrate(engine: Engine, quick: bool = False) -> tuple[StepCostModel, dict[str, Any]]:
    batches = QUICK_BATCHES if quick else FULL_BATCHES
    windows = (64, 320)
    steps = 4 if quick else 6
    decode: list[tuple[int, int, float]] = []
    for b in (1, 1):  # warm-up: first calls pay one-off allocation costs
        decode_samples(engine, b, 32, 2)
    for sweep in (batches, tuple(reversed(batches))):
        for b in sweep:
            for w in windows:
                decode.extend(decode_samples(engine, b, w, steps))
    shapes = PREFILL_SHAPES[:4] if quick else PREFILL_SHAPES
    prefill = [prefill_sample(engine, n, p) for n, p in (*shapes, *reversed(shapes))]
    overhead = loop_overhead_s(engine)
    model = fit_step_cost(decode, prefill, overhead_s=overhead)
    return model, {"decode_samples": decode, "prefill_samples": prefill, "overhead_s": overhead}


def probe_drift(engine: Engine, model: StepCostModel) -> float:
    """Measured / predicted decode time on a few sizes (1.0 = the cached fit still holds)."""
    ratios = []
    for b in (1, 4, 8, 16, 32):
        ((_, ctx, t),) = decode_samples(engine, b, 128, 6)
        ratios.append(t / model.decode_s(b, ctx))
    return statistics.median(ratios)


def load_or_calibrate(
    engine: Engine, cache: Path, quick: bool, force: bool, tolerance: float = 0.35
) -> tuple[StepCostModel, dict[str, Any]]:
    """The cached fit if a probe agrees within ``tolerance``, else a fresh calibration (cached)."""
    if cache.exists() and not force:
        data = json.loads(cache.read_text())
        model = StepCostModel(**data["model"])
        drift = probe_drift(engine, model)
        if abs(drift - 1.0) <= tolerance:
            return model, {"source": "cached", "drift": drift, "measured_at": data["measured_at"]}
    t0 = time.time()
    model, samples = calibrate(engine, quick=quick)
    cache.parent.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    cache.write_text(json.dumps({"model": asdict(model), "measured_at": stamp, **samples}, indent=1))
    return model, {"source": "measured", "drift": 1.0, "measured_at": stamp, "seconds": time.time() - t0}
