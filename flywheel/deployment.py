"""Which workers ``flywheel up`` starts, and where: the HELR deployer over the devices at hand.

Devices. On a CUDA machine every GPU is a device (its memory); without a GPU every CPU core is a
device with an equal share of memory, and each CPU worker runs pinned to its core(s). Speeds are
measured, not assumed: ``measure_speeds`` times the same memory-bound matrix-vector product (the
shape of a decode step) on every device, relative to the first.

Models. A model's per-token latency comes from the workers' online-calibrated cost models in their
heartbeats (``measured_per_token_ms``; the newest per model), else from the catalogue. Both are
per-token latencies on some device; they are converted to the first device's speed with the
measured speeds.

Enforcement. ``WorkerPlan.env()`` is the environment the supervisor starts the worker with:
``FLYWHEEL_WORKER_CPUS`` (affinity and torch threads), ``CUDA_VISIBLE_DEVICES`` in pipeline order,
and for a replica over several GPUs vLLM's pipeline parallelism with HELR's layer split
(``FLYWHEEL_WORKER_PIPELINE_PARALLEL``, ``FLYWHEEL_WORKER_PIPELINE_LAYERS``, applied by
``workers.main`` through ``VLLM_PP_LAYER_PARTITION``).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

from core.catalog import CATALOG
from core.scheduling.deployer import DeployConfig, Device, ModelProfile, plan_deployment


@dataclass(frozen=True)
class WorkerPlan:
    model: str
    devices: tuple[str, ...]
    """Device names ("cuda:0" or "cpu3") the replica is placed on, pipeline order."""
    cpus: tuple[int, ...]
    """CPU cores to pin the worker to (CPU devices only)."""
    layers: tuple[int, ...] = ()
    """Decoder layers on each device, same order (HELR's split)."""

    def env(self) -> dict[str, str]:
        """The worker process's environment that enforces this placement."""
        env: dict[str, str] = {}
        if self.cpus:
            env["FLYWHEEL_WORKER_CPUS"] = ",".join(map(str, self.cpus))
        gpus = [d.split("#")[0].split(":")[1] for d in self.devices if d.startswith("cuda:")]
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(dict.fromkeys(gpus))
            if len(gpus) > 1:
                env["FLYWHEEL_WORKER_PIPELINE_PARALLEL"] = str(len(gpus))
                env["FLYWHEEL_WORKER_PIPELINE_LAYERS"] = ",".join(map(str, self.layers))
        return env


@contextlib.contextmanager
def _on_core(core: int) -> Iterator[None]:
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {core})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def probe_seconds(device: str, size: int = 2048, repeats: int = 20) -> float:
    """Median time of a ``size`` x ``size`` fp32 matrix-vector product on ``device`` (one thread)."""
    import statistics

    import torch

    dev = "cpu" if device.startswith("cpu") else device.split("#", maxsplit=1)[0]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ctx = _on_core(int(device[3:].split("#", maxsplit=1)[0])) if device.startswith("cpu") and hasattr(
            os, "sched_setaffinity") else contextlib.nullcontext()
        with ctx:
            w = torch.randn(size, size, device=dev)
            x = torch.randn(size, device=dev)
            times = []
            for _ in range(repeats + 2):
                if dev.startswith("cuda"):
                    torch.cuda.synchronize(dev)
                t0 = time.perf_counter()
                w @ x
                if dev.startswith("cuda"):
                    torch.cuda.synchronize(dev)
                times.append(time.perf_counter() - t0)
            return statistics.median(times[2:])
    finally:
        torch.set_num_threads(threads)


def measure_speeds(devices: list[Device]) -> list[Device]:
    """The devices with measured speeds, relative to the first (1.0)."""
    times = [probe_seconds(d.name) for d in devices]
    return [replace(d, speed=times[0] / t) for d, t in zip(devices, times, strict=True)]


def detect_devices(memory_budget_gib: float | None = None, measure: bool = True) -> list[Device]:
    devices: list[Device] = []
    try:
        import torch

        if torch.cuda.is_available():
            devices = [Device(f"cuda:{i}", torch.cuda.get_device_properties(i).total_memory / 2**30, 1.0)
                       for i in range(torch.cuda.device_count())]
    except ImportError:
        pass
    if not devices:
        cores = (sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                 else list(range(os.cpu_count() or 1)))
        total = memory_budget_gib or (os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30) * 0.6
        devices = [Device(f"cpu{c}", total / len(cores), 1.0) for c in cores]
    return measure_speeds(devices) if measure and len(devices) > 1 else devices


def measured_per_token_ms(heartbeats: list[dict[str, Any]]) -> dict[str, float]:
    """Batch-1 per-token latency per model from the newest calibrated heartbeat of each model."""
    newest: dict[str, tuple[int, float]] = {}
    for beat in heartbeats:
        cost = beat.get("step_cost")
        if not cost or cost.get("samples", 0) <= 0:
            continue
        t = beat["event_time"] if isinstance(beat["event_time"], int) else int(beat["event_time"].timestamp() * 1000)
        per_token = 1000.0 * (cost["decode_base_s"] + cost["decode_per_row_s"] + 256 * cost["decode_per_cell_s"]
                              + cost.get("overhead_s", 0.0))
        if beat["model"] not in newest or t >= newest[beat["model"]][0]:
            newest[beat["model"]] = (t, per_token)
    return {m: v for m, (_, v) in newest.items()}


def plan_workers(models: list[str] | None = None, devices: list[Device] | None = None,
                 demand_tokens_per_s: float = 5.0, per_token_ms: dict[str, float] | None = None) -> list[WorkerPlan]:
    """One WorkerPlan per replica the deployer chooses (every model gets at least one).

    ``per_token_ms``: measured latencies (``measured_per_token_ms``), on a device of the first
    device's speed; models missing from it use the catalogue's figure.
    """
    names = models or list(CATALOG)
    devices = devices or detect_devices()
    if len(devices) < len(names):
        # Fewer devices than models: share them round robin (the deployer needs one each).
        devices = [Device(f"{devices[i % len(devices)].name}#{i}", devices[i % len(devices)].memory_gib / 2,
                          devices[i % len(devices)].speed) for i in range(len(names))]
    measured = per_token_ms or {}
    profiles = [ModelProfile(n, CATALOG[n].layers, CATALOG[n].memory_gib,
                             measured.get(n, CATALOG[n].per_token_latency_ms), demand_tokens_per_s) for n in names]
    deployment = plan_deployment(profiles, devices[:12], config=DeployConfig(reserve_gib=0.25))
    plans = []
    for replica in deployment.replicas:
        device_names = tuple(devices[i].name for i in replica.placement.devices)
        cpus = tuple(int(d[3:].split("#")[0]) for d in device_names if d.startswith("cpu"))
        plans.append(WorkerPlan(replica.model, device_names, cpus, replica.placement.layers))
    return plans


async def read_measured_latencies(services: Any) -> dict[str, float]:
    """Per-token latencies from the heartbeats topic (compacted: the newest beat of every worker)."""
    from streams.replay import read_topics

    beats = []
    for record in await read_topics(services.kafka, [services.catalog.heartbeats]):
        with contextlib.suppress(Exception):  # heartbeats are advisory
            beats.append((await services.serde.deserialize(record.value))[1])
    return measured_per_token_ms(beats)
