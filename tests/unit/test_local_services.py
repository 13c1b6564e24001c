"""A port a local service needs is taken: the error names the port and the setting that moves it,
and `flywheel up` says so in one line instead of a traceback (nothing is started meanwhile)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

from infra.embedded_pg import EmbeddedPostgres
from infra.localkafka import LocalKafka
from infra.ports import PortTaken, port_free


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port another process (this test) is listening on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_port_free_tells_a_listening_port_from_a_free_one(taken_port):
    assert not port_free(taken_port)
    assert port_free(free_port())


def test_kafka_names_its_port_setting_and_who_holds_the_port(tmp_path, taken_port):
    with pytest.raises(PortTaken) as caught:
        LocalKafka(tmp_path, taken_port, free_port()).start("apache")
    message = str(caught.value)
    assert f"port {taken_port} is already in use by pid {os.getpid()}" in message
    assert "FLYWHEEL_KAFKA_PORT=" in message and "FLYWHEEL_KAFKA_BOOTSTRAP" in message
    assert not (tmp_path / "kafka" / "broker.json").exists()  # nothing was started


def test_kafka_controller_port_is_checked_too(tmp_path, taken_port):
    with pytest.raises(PortTaken, match="FLYWHEEL_KAFKA_CONTROLLER_PORT"):
        LocalKafka(tmp_path, free_port(), taken_port).start("apache")


def test_postgres_names_its_port_setting(tmp_path, taken_port):
    with pytest.raises(PortTaken, match=f"port {taken_port} .*FLYWHEEL_POSTGRES_PORT=.*FLYWHEEL_DATABASE_URL"):
        EmbeddedPostgres(tmp_path, taken_port).start()
    assert not (tmp_path / "postgres" / "data").exists()


def test_flywheel_up_reports_a_taken_port_without_a_traceback(tmp_path, taken_port):
    env = {**os.environ, "FLYWHEEL_HOME": str(tmp_path), "FLYWHEEL_KAFKA_PORT": str(taken_port),
           "FLYWHEEL_KAFKA_CONTROLLER_PORT": str(free_port()), "FLYWHEEL_POSTGRES_PORT": str(free_port()),
           "FLYWHEEL_GATEWAY_PORT": str(free_port()), "FLYWHEEL_KAFKA_BROKER": "apache"}
    env.pop("FLYWHEEL_KAFKA_BOOTSTRAP", None)
    env.pop("FLYWHEEL_DATABASE_URL", None)
    done = subprocess.run([sys.executable, "-m", "flywheel.cli", "up"], env=env, capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert f"port {taken_port} is already in use" in done.stderr and "FLYWHEEL_KAFKA_PORT" in done.stderr
    assert not (tmp_path / "postgres" / "data").exists()  # it stopped before starting anything else


def test_flywheel_up_checks_the_gateway_port_first(tmp_path, taken_port):
    env = {**os.environ, "FLYWHEEL_HOME": str(tmp_path), "FLYWHEEL_GATEWAY_PORT": str(taken_port)}
    done = subprocess.run([sys.executable, "-m", "flywheel.cli", "up"], env=env, capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "FLYWHEEL_GATEWAY_PORT" in done.stderr
    assert not (tmp_path / "kafka").exists()
