"""A Prometheus metrics endpoint per process (``/metrics`` on FLYWHEEL_METRICS_PORT, 0 = any free port)."""

from __future__ import annotations

import logging
import socket

from prometheus_client import start_http_server

log = logging.getLogger(__name__)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start_metrics(port: int, process: str, host: str = "127.0.0.1") -> int:
    """Serve this process's metrics; returns the port actually used."""
    chosen = port or _free_port()
    start_http_server(chosen, addr=host)
    log.info("%s metrics on http://%s:%d/metrics", process, host, chosen)
    return chosen
