"""`flywheel up` stops what it started: after Ctrl-C (SIGINT) no broker, Postgres or child process
that it started is left running. It runs on its own state directory and ports, so it starts its
own broker and Postgres (the session's test services are not touched)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from infra.embedded_pg import EmbeddedPostgres
from infra.localkafka import LocalKafka

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not stat.exists() or stat.read_text().rsplit(")", 1)[-1].split()[0] != "Z"


def wait_for(predicate, timeout_s: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"{what}; flywheel up said:\n{log.read_text()[-3000:]}"
        time.sleep(0.5)


def test_sigint_stops_the_broker_postgres_and_children_it_started(tmp_path):
    home = tmp_path / "home"
    kafka_port, controller_port, pg_port = free_port(), free_port(), free_port()
    env = {**os.environ, "FLYWHEEL_HOME": str(home), "FLYWHEEL_KAFKA_PORT": str(kafka_port),
           "FLYWHEEL_KAFKA_CONTROLLER_PORT": str(controller_port), "FLYWHEEL_POSTGRES_PORT": str(pg_port),
           "FLYWHEEL_GATEWAY_PORT": str(free_port()), "FLYWHEEL_KAFKA_BROKER": "apache", "FLYWHEEL_LOG_LEVEL": "INFO"}
    for external in ("FLYWHEEL_KAFKA_BOOTSTRAP", "FLYWHEEL_DATABASE_URL", "FLYWHEEL_TOPIC_PREFIX"):
        env.pop(external, None)
    log = tmp_path / "up.log"
    with log.open("wb") as out:
        up = subprocess.Popen([sys.executable, "-m", "flywheel.cli", "up", "--no-trainer"], env=env,
                              stdout=out, stderr=subprocess.STDOUT)
    broker, postgres = LocalKafka(home, kafka_port, controller_port), EmbeddedPostgres(home, pg_port)
    try:
        wait_for(lambda: "started gateway" in log.read_text(), 300, "the children did not start", log)
        broker_pid = json.loads((home / "kafka" / "broker.json").read_text())["pid"]
        pg_pid = postgres.status().pid
        children = [int(p) for p in re.findall(r"started \S+ \(pid (\d+)\)", log.read_text())]
        assert pg_pid is not None and alive(broker_pid) and len(children) >= 4
        up.send_signal(signal.SIGINT)
        assert up.wait(180) == 0, log.read_text()[-3000:]
        left = [pid for pid in [broker_pid, pg_pid, *children] if alive(pid)]
        assert not left, f"still running after Ctrl-C: {left}\n{log.read_text()[-3000:]}"
        assert not broker.status().running and not postgres.status().running
        assert "stopped the local Kafka broker" in log.read_text()
    finally:
        if up.poll() is None:
            up.kill()
            up.wait(30)
        broker.stop()
        postgres.stop()


def test_services_that_were_already_running_are_left_running(tmp_path):
    """`flywheel up` only stops what it started: a broker started before it keeps running."""
    home = tmp_path / "home"
    kafka_port, controller_port = free_port(), free_port()
    broker = LocalKafka(home, kafka_port, controller_port)
    broker.start("apache")
    env = {**os.environ, "FLYWHEEL_HOME": str(home), "FLYWHEEL_KAFKA_PORT": str(kafka_port),
           "FLYWHEEL_KAFKA_CONTROLLER_PORT": str(controller_port), "FLYWHEEL_POSTGRES_PORT": str(free_port()),
           "FLYWHEEL_GATEWAY_PORT": str(free_port()), "FLYWHEEL_LOG_LEVEL": "INFO"}
    for external in ("FLYWHEEL_KAFKA_BOOTSTRAP", "FLYWHEEL_DATABASE_URL", "FLYWHEEL_TOPIC_PREFIX"):
        env.pop(external, None)
    log = tmp_path / "up.log"
    try:
        with log.open("wb") as out:
            up = subprocess.Popen([sys.executable, "-m", "flywheel.cli", "up", "--no-trainer", "--no-gateway"],
                                  env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: "started router" in log.read_text(), 300, "the children did not start", log)
            up.send_signal(signal.SIGINT)
            assert up.wait(180) == 0, log.read_text()[-3000:]
        finally:
            if up.poll() is None:
                up.kill()
                up.wait(30)
        assert broker.status().running, "a broker flywheel up did not start was stopped"
        assert "stopped the embedded PostgreSQL" in log.read_text()
    finally:
        broker.stop()
        EmbeddedPostgres(home, int(env["FLYWHEEL_POSTGRES_PORT"])).stop()
