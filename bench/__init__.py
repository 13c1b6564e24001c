"""Benchmarks behind ``flywheel bench NAME [--json]``.

Each benchmark module defines ``add_arguments(parser)`` and ``run(args) -> dict``; the CLI
prints the dict as one JSON object with ``--json`` and as a readable table otherwise. Every
benchmark compares variants side by side in one run and reports ratios, because this kind of
machine is shared and noisy.
"""

from __future__ import annotations

BENCHMARKS: dict[str, str] = {
    "pipeline": "bench.pipeline",
    "routing": "bench.routing",
    "scheduling": "bench.scheduling",
    "engine": "bench.engine",
    "personalization": "bench.personalization",
    "personalization-live": "bench.personalization_live",
    "rlhf": "bench.rlhf",
    "comigs": "bench.comigs",
}
