"""Which workers ``flywheel up`` starts: the HELR deployer over the devices at hand.

On a CUDA machine every GPU is a device (its memory, speed 1.0). Without a GPU every CPU core is
a device with an equal share of memory: each worker then runs single-threaded, pinned to its
core(s), which is how the torch engine was measured (docs/BENCHMARKS.md). Model profiles come from
the catalogue (layers, weight memory, measured per-token latency).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from core.catalog import CATALOG
from core.scheduling.deployer import DeployConfig, Device, ModelProfile, plan_deployment


@dataclass(frozen=True)
class WorkerPlan:
    model: str
    devices: tuple[str, ...]
    """Device names ("cuda:0" or "cpu3") the replica is placed on, pipeline order."""
    cpus: tuple[int, ...]
    """CPU cores to pin the worker to (CPU devices only)."""


def detect_devices(memory_budget_gib: float | None = None) -> list[Device]:
    try:
        import torch

        if torch.cuda.is_available():
            return [Device(f"cuda:{i}", torch.cuda.get_device_properties(i).total_memory / 2**30, 1.0)
                    for i in range(torch.cuda.device_count())]
    except ImportError:
        pass
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    total = memory_budget_gib or (os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30) * 0.6
    return [Device(f"cpu{c}", total / len(cores), 1.0) for c in cores]


def plan_workers(models: list[str] | None = None, devices: list[Device] | None = None,
                 demand_tokens_per_s: float = 5.0) -> list[WorkerPlan]:
    """One WorkerPlan per replica the deployer chooses (every model gets at least one)."""
    names = models or list(CATALOG)
    devices = devices or detect_devices()
    if len(devices) < len(names):
        # Fewer devices than models: share them round robin (the deployer needs one each).
        devices = [Device(f"{devices[i % len(devices)].name}#{i}", devices[i % len(devices)].memory_gib / 2,
                          devices[i % len(devices)].speed) for i in range(len(names))]
    profiles = [ModelProfile(n, CATALOG[n].layers, CATALOG[n].memory_gib, CATALOG[n].per_token_latency_ms,
                             demand_tokens_per_s) for n in names]
    deployment = plan_deployment(profiles, devices[:12], config=DeployConfig(reserve_gib=0.25))
    plans = []
    for replica in deployment.replicas:
        device_names = tuple(devices[i].name for i in replica.placement.devices)
        cpus = tuple(int(d[3:].split("#")[0]) for d in device_names if d.startswith("cpu"))
        plans.append(WorkerPlan(replica.model, device_names, cpus))
    return plans
