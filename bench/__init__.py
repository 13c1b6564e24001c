"""Benchmarks behind ``flywheel bench NAME [--json]``.

Each benchmark module defines ``add_arguments(parser)`` and ``run(args) -> dict`` and is listed in
``flywheel/commands/bench.py`` (by module name: benchmarks sit above the edge, which never imports
them statically); the CLI prints the dict as one JSON object with ``--json`` and as a readable table otherwise. Every
benchmark compares variants side by side in one run and reports ratios, because this kind of
machine is shared and noisy.
"""

