"""The gateway's Prometheus metrics (Grafana's dashboard queries them) move with its traffic."""

from __future__ import annotations

from fastapi.testclient import TestClient
from prometheus_client import REGISTRY

from flywheel.gateway.app import Gateway, create_app
from infra.settings import Settings


def count(endpoint: str, status: str) -> float:
    value = REGISTRY.get_sample_value("flywheel_gateway_requests_total", {"endpoint": endpoint, "status": status})
    return value or 0.0


def test_requests_are_counted_by_endpoint_and_status():
    http = TestClient(create_app(Settings()))  # no lifespan: these endpoints need no broker
    before = count("/healthz", "200"), count("other", "404"), count("/v1/feedback", "413")
    assert http.get("/healthz").status_code == 200
    assert http.get("/nowhere/" + "x" * 40).status_code == 404  # unknown paths share one label
    assert http.post("/v1/feedback", content=b"{}", headers={"content-length": "99999999"}).status_code == 413
    after = count("/healthz", "200"), count("other", "404"), count("/v1/feedback", "413")
    assert [a - b for a, b in zip(after, before, strict=True)] == [1, 1, 1]


def test_inflight_gauge_follows_the_gateway():
    gateway = Gateway(Settings())
    gateway.inflight += 2
    assert REGISTRY.get_sample_value("flywheel_gateway_inflight") == 2
    gateway.inflight -= 2
    assert REGISTRY.get_sample_value("flywheel_gateway_inflight") == 0
