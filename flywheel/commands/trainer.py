"""``flywheel trainer``: the live RLHF trainer (fused PPO on the served SmolLM2 policy)."""

from __future__ import annotations

import argparse

from infra.settings import get_settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per rank (default: FLYWHEEL_TRAINER_THREADS_PER_RANK)")


def run(args: argparse.Namespace) -> int:

    from core.rlhf.buffer import OffPolicyConfig
    from infra.connect import Services, run_until_stopped
    from infra.metrics import start_metrics
    from infra.runtime import run_async, setup_logging
    from streams.tracing import setup_tracing
    from workers.trainer.live import LiveConfig, LiveTrainer
    from workers.trainer_service import TrainerService, TrainerServiceConfig

    settings = get_settings()
    setup_logging(settings.log_level)
    setup_tracing("flywheel-trainer", settings.otlp_endpoint, sample_ratio=settings.trace_sample_ratio)
    start_metrics(settings.metrics_port, "trainer", settings.metrics_host)
    if settings.trainer_model != "smollm2-135m":
        raise SystemExit(f"the trainer trains smollm2-135m; {settings.trainer_model!r} is not supported")
    batch = settings.trainer_batch_size
    config = LiveConfig(
        store_root=settings.artifacts_dir.resolve() / "checkpoints",
        model=settings.trainer_model,
        ranks=settings.trainer_ranks,
        threads_per_rank=args.threads or settings.trainer_threads_per_rank,
        batch_size=batch,
        microbatches=min(settings.trainer_microbatches, batch),
        generate=settings.trainer_generate,
        max_new_tokens=settings.trainer_max_new_tokens,
        fused=settings.trainer_fused,
        rt=settings.trainer_rt,
        actor_lr=settings.trainer_actor_lr,
        critic_lr=settings.trainer_critic_lr,
        min_interval_s=settings.trainer_min_interval_s,
        off_policy=OffPolicyConfig(max_staleness=settings.trainer_max_staleness,
                                   adapter_rollouts=settings.trainer_adapter_rollouts,
                                   sampled_only=settings.trainer_sampled_only,
                                   reward_timeout_s=settings.trainer_reward_timeout_s),
    )
    trainer = LiveTrainer.start(config)  # the ranks load the model and the fused schedule is planned

    def build(services: Services) -> TrainerService:
        return TrainerService(services, trainer, TrainerServiceConfig(model=settings.trainer_model))

    try:
        run_async(run_until_stopped(settings, "flywheel-trainer", build))
    finally:
        trainer.close()
    return 0
