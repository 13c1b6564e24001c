"""Shared test configuration: uvloop for every async test, and the test service settings."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import uvloop
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from streams.tracing import setup_tracing

REPO_ROOT = Path(__file__).resolve().parent.parent
# Tests use their own state directory and ports so they never touch a developer's `flywheel up`.
TEST_HOME = Path(os.environ.get("FLYWHEEL_TEST_HOME", REPO_ROOT / ".flywheel-test"))
TEST_KAFKA_PORT = int(os.environ.get("FLYWHEEL_TEST_KAFKA_PORT", "29092"))
TEST_PG_PORT = int(os.environ.get("FLYWHEEL_TEST_PG_PORT", "25432"))


# One tracer provider for the whole session (OpenTelemetry allows setting it once per process);
# tests read finished spans from SPANS and clear it when they need a clean slate.
SPANS = InMemorySpanExporter()
setup_tracing("flywheel-tests", exporter=SPANS)


@pytest.fixture(scope="session")
def event_loop_policy():
    return uvloop.EventLoopPolicy()


def flywheel_env(**extra: str) -> dict[str, str]:
    """Environment for a `flywheel` subprocess pointed at the test services."""
    env = dict(os.environ)
    env.update({
        "FLYWHEEL_HOME": str(TEST_HOME),
        "FLYWHEEL_KAFKA_PORT": str(TEST_KAFKA_PORT),
        "FLYWHEEL_KAFKA_CONTROLLER_PORT": str(TEST_KAFKA_PORT + 1),
        "FLYWHEEL_POSTGRES_PORT": str(TEST_PG_PORT),
    })
    env.update(extra)
    return env
