"""``flywheel gateway``: the OpenAI-compatible API and dashboard (uvicorn on uvloop)."""

from __future__ import annotations

import argparse

from infra.settings import get_settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default=None)
    parser.add_argument("--port", type=int, default=None)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from flywheel.gateway.app import create_app
    from infra.metrics import start_metrics
    from infra.runtime import setup_logging
    from streams.tracing import setup_tracing

    settings = get_settings()
    setup_logging(settings.log_level)
    setup_tracing("flywheel-gateway", settings.otlp_endpoint, sample_ratio=settings.trace_sample_ratio)
    start_metrics(settings.metrics_port, "gateway", settings.metrics_host)
    uvicorn.run(create_app(settings), host=args.host or settings.gateway_host, port=args.port or settings.gateway_port,
                loop="uvloop", log_level=settings.log_level.lower(), access_log=False)
    return 0
