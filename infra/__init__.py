"""Flywheel's infrastructure layer: settings, connections, Postgres, the local Kafka and Postgres
servers, metrics and telemetry. Agents and workers build on it; the edge (``flywheel/``: CLI,
gateway, demo, supervisor) builds on everything. It imports ``core`` and ``streams``, never upward.
"""
