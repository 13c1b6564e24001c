"""Process entry for ``flywheel worker``: pin threads, load the engine, run the worker on uvloop."""

from __future__ import annotations

import asyncio
import logging
import os
import signal

from infra.connect import connect
from infra.metrics import start_metrics
from infra.runtime import run_async, setup_logging
from infra.settings import Settings
from streams.tracing import setup_tracing
from workers.engines.base import Engine
from workers.serving import ServingConfig, ServingLoop
from workers.worker import InferenceWorker, WorkerConfig

log = logging.getLogger(__name__)


def make_engine(model: str, engine: str, settings: Settings) -> Engine:
    if engine == "echo":  # answers instantly with the prompt's words: benchmarks of the event plane
        from workers.engines.echo import EchoEngine

        return EchoEngine(model)
    import torch

    if engine == "vllm" or (engine == "auto" and torch.cuda.is_available() and _has_vllm()):
        from workers.engines.vllm_engine import VllmEngine

        return VllmEngine.from_catalog(model, settings.home.resolve() / "models")
    from workers.engines.torch_engine import TorchEngine

    return TorchEngine.from_catalog(model)


def _has_vllm() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def serve(settings: Settings, model: str, worker_id: str, policy: str, engine: str, rollout_sample: float,
          cpus: list[int] | None) -> int:
    setup_logging(settings.log_level)
    setup_tracing(f"flywheel-worker-{model}", settings.otlp_endpoint, sample_ratio=settings.trace_sample_ratio)
    import torch

    if cpus:
        os.sched_setaffinity(0, cpus)
        torch.set_num_threads(len(cpus))
    start_metrics(settings.metrics_port, f"worker-{model}", settings.metrics_host)
    serving = ServingLoop(make_engine(model, engine, settings), config=ServingConfig(policy=policy))
    log.info("worker %s serving %s with %s", worker_id, model, policy)

    async def main() -> None:
        services = await connect(settings, f"flywheel-worker-{worker_id}")
        worker = InferenceWorker(services, serving, WorkerConfig(model, worker_id, rollout_sample=rollout_sample))
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, worker.stop.set)
        try:
            await worker.run()
        finally:
            await services.close()

    run_async(main())
    return 0
