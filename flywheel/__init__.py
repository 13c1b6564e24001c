"""Flywheel's runtime: settings, command line, Postgres, local brokers, client, gateway, supervisor."""

__version__ = "0.1.0"
