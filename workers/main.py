"""Process entry for ``flywheel worker``: pin the placement, load the engine, run the worker on uvloop.

Placement (``flywheel.deployment`` decides it; the supervisor passes it in the environment):
``FLYWHEEL_WORKER_CPUS`` pins a CPU worker's threads to its cores; ``CUDA_VISIBLE_DEVICES`` limits a
GPU worker to its devices; a replica over several GPUs runs vLLM with
``FLYWHEEL_WORKER_PIPELINE_PARALLEL`` stages of ``FLYWHEEL_WORKER_PIPELINE_LAYERS`` layers each
(HELR's split, through vLLM's ``VLLM_PP_LAYER_PARTITION``) or ``FLYWHEEL_WORKER_TENSOR_PARALLEL``.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from core.catalog import get_model
from core.scheduling.calibration import prior_cost
from core.scheduling.kv import KvBudget
from core.scheduling.policies import SchedulerConfig
from infra.connect import Services, run_until_stopped
from infra.metrics import start_metrics
from infra.runtime import run_async, setup_logging
from infra.settings import Settings
from streams.tracing import setup_tracing
from workers.engines.base import Engine
from workers.serving import ServingConfig, ServingLoop
from workers.worker import InferenceWorker, WorkerConfig

log = logging.getLogger(__name__)


def vllm_parallel_kwargs(settings: Settings) -> dict[str, Any]:
    """vLLM engine arguments for the placement the deployer chose (empty for one device)."""
    kwargs: dict[str, Any] = {}
    if settings.worker_tensor_parallel > 1:
        kwargs["tensor_parallel_size"] = settings.worker_tensor_parallel
    if settings.worker_pipeline_parallel > 1:
        kwargs["pipeline_parallel_size"] = settings.worker_pipeline_parallel
        if settings.worker_pipeline_layers:
            os.environ["VLLM_PP_LAYER_PARTITION"] = settings.worker_pipeline_layers
    return kwargs


def make_engine(model: str, engine: str, settings: Settings) -> Engine:
    if engine == "echo":  # answers instantly with the prompt's words: benchmarks of the event plane
        from workers.engines.echo import EchoEngine

        return EchoEngine(model)
    import torch

    if engine == "vllm" or (engine == "auto" and torch.cuda.is_available() and _has_vllm()):
        from workers.engines.vllm_engine import VllmEngine

        return VllmEngine.from_catalog(model, settings.home.resolve() / "models", **vllm_parallel_kwargs(settings))
    from workers.engines.torch_engine import TorchEngine

    dtype = settings.worker_dtype
    if torch.cuda.is_available() and dtype.startswith("int8"):
        dtype = "float32"  # the int8 kernels are CPU kernels
    return TorchEngine.from_catalog(model, dtype=dtype)


def _has_vllm() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def serving_config(settings: Settings, engine: Engine, policy: str) -> ServingConfig:
    """The scheduler's configuration: the settings, and a KV budget the engine can honour."""
    kv = KvBudget()
    per_token = engine.kv_bytes_per_token
    if settings.worker_kv_budget_mb > 0 and per_token and engine.supports_preemption:
        swap = settings.worker_swap_budget_mb * 2**20 if engine.supports_swap else 0.0
        kv = KvBudget.from_memory(settings.worker_kv_budget_mb * 2**20, per_token, settings.worker_kv_block_tokens,
                                  swap_bytes=swap)
    preemption = settings.worker_preemption if engine.supports_swap and kv.swap_blocks else "recompute"
    return ServingConfig(policy=policy, scheduler=SchedulerConfig(
        max_batch=settings.worker_max_batch, kv=kv, preemption=preemption, aging_s=settings.worker_aging_s,
        shorten_min_tokens=settings.worker_shorten_min_tokens))


def serve(settings: Settings, model: str, worker_id: str, policy: str, engine: str, rollout_sample: float,
          cpus: list[int] | None) -> int:
    setup_logging(settings.log_level)
    setup_tracing(f"flywheel-worker-{model}", settings.otlp_endpoint, sample_ratio=settings.trace_sample_ratio)
    import torch

    if cpus:
        os.sched_setaffinity(0, cpus)
        torch.set_num_threads(len(cpus))
    start_metrics(settings.metrics_port, f"worker-{model}", settings.metrics_host)
    built = make_engine(model, engine, settings)
    config = serving_config(settings, built, policy)
    # The cost model starts from the catalogue's per-token latency and calibrates on this worker's steps.
    serving = ServingLoop(built, config=config, cost=prior_cost(get_model(model).per_token_latency_ms))
    log.info("worker %s serving %s with %s on %s (KV budget %d blocks of %d tokens, %s preemption)", worker_id,
             model, policy, built.device_name, config.scheduler.kv.total_blocks, config.scheduler.kv.block_tokens,
             config.scheduler.preemption)

    def build(services: Services) -> InferenceWorker:
        return InferenceWorker(services, serving, WorkerConfig(model, worker_id, rollout_sample=rollout_sample,
                                                               reroute=settings.worker_reroute))

    run_async(run_until_stopped(settings, f"flywheel-worker-{worker_id}", build))
    return 0
