"""``flywheel trainer``: the RLHF trainer consumer (PPO on the served SmolLM2 policy)."""

from __future__ import annotations

import argparse

from infra.settings import get_settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")


def run(args: argparse.Namespace) -> int:
    import asyncio
    import signal

    import torch

    from infra.connect import connect
    from infra.metrics import start_metrics
    from infra.runtime import run_async, setup_logging
    from streams.tracing import setup_tracing
    from workers.trainer.models import build_smollm2_models
    from workers.trainer.trainer import Trainer, TrainerConfig
    from workers.trainer_service import TrainerService, TrainerServiceConfig

    settings = get_settings()
    setup_logging(settings.log_level)
    setup_tracing("flywheel-trainer", settings.otlp_endpoint, sample_ratio=settings.trace_sample_ratio)
    if args.threads:
        torch.set_num_threads(args.threads)
    start_metrics(settings.metrics_port, "trainer", settings.metrics_host)
    if settings.trainer_model != "smollm2-135m":
        raise SystemExit(f"the trainer trains smollm2-135m; {settings.trainer_model!r} is not supported")
    models, _ = build_smollm2_models()
    batch = settings.trainer_batch_size
    trainer = Trainer(models, TrainerConfig(store_root=settings.artifacts_dir.resolve() / "checkpoints",
                                            batch_size=batch, minibatch_size=batch // 2 if batch % 2 == 0 else batch,
                                            reward_timeout_s=settings.trainer_reward_timeout_s))

    async def main() -> None:
        services = await connect(settings, "flywheel-trainer")
        service = TrainerService(services, trainer, TrainerServiceConfig(model=settings.trainer_model))
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, service.stop.set)
        try:
            await service.run()
        finally:
            await services.close()

    run_async(main())
    return 0
