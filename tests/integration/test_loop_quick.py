"""`flywheel bench loop --quick` as a user runs it: the CLI drives the real system end to end (the
OpenAI client against the gateway, Kafka, router, workers on the real models, feedback through
``POST /v1/feedback``) in two arms, ``frozen`` and ``all``, and reports what it measured.

This is the closed-loop benchmark's smoke test, not its result: 16 requests cannot show learning.
It checks that every ask was answered, that feedback reached the router in the learning arm and
never in the frozen one, and that the report has the shape docs/BENCHMARKS.md quotes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TEST_HOME, TEST_KAFKA_PORT, TEST_PG_PORT

pytestmark = [pytest.mark.integration, pytest.mark.model]


def test_quick_closed_loop_runs_both_arms_end_to_end(kafka_broker, postgres, tmp_path):
    env = {**os.environ, "FLYWHEEL_HOME": str(TEST_HOME), "FLYWHEEL_KAFKA_PORT": str(TEST_KAFKA_PORT),
           "FLYWHEEL_KAFKA_CONTROLLER_PORT": str(TEST_KAFKA_PORT + 1), "FLYWHEEL_POSTGRES_PORT": str(TEST_PG_PORT),
           "FLYWHEEL_KAFKA_BROKER": "apache"}
    for external in ("FLYWHEEL_KAFKA_BOOTSTRAP", "FLYWHEEL_DATABASE_URL", "FLYWHEEL_TOPIC_PREFIX"):
        env.pop(external, None)
    plot = tmp_path / "loop.svg"
    done = subprocess.run([sys.executable, "-m", "flywheel.cli", "bench", "loop", "--quick", "--json",
                           "--plot", str(plot)], env=env, capture_output=True, text=True, timeout=1200,
                          cwd=Path(__file__).resolve().parents[2], check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout[done.stdout.index("{"):])

    assert set(result["final"]) == {"frozen", "all"}
    for arm, run in result["per_seed"]["0"].items():
        assert run["errors"] == 0, f"{arm}: {run['errors']} asks failed"
        assert sum(w["size"] for w in run["windows"]) == 16
        assert run["restarts"] == 0, f"{arm}: a process crashed and was restarted"
    for arm in ("frozen", "all"):
        assert 0.0 <= result["final"][arm]["accuracy"] <= 1.0
        assert result["final"][arm]["cost"] > 0  # catalogue prices are charged
    # Feedback went through the public API and the learning router applied it.
    assert result["effect_latency_s"]["router"]["n"] > 0
    assert result["lift"]["frozen"] == 1.0 and result["lift"]["all"] > 0  # reward relative to frozen
    assert plot.exists() and plot.read_text().startswith("<svg")
