"""Flywheel's pure core: algorithms with no Kafka, faust or database imports.

Everything here is importable and testable without a broker, a database or a GPU.
Agents (``agents/``) and workers (``workers/``) are thin glue around these modules:
decode an event -> call the core -> produce events.
"""
