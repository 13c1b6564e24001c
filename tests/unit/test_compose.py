"""compose/docker-compose.yml is validated statically (Docker does not run here): every service has an
image, its healthcheck and dependencies make sense, and every file it mounts exists."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

COMPOSE = Path(__file__).resolve().parent.parent.parent / "compose"
SPEC = yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())
SERVICES = SPEC["services"]
FLYWHEEL = {"router", "personalizer", "rewarder", "worker-smollm2", "worker-gemma3", "trainer", "gateway"}
INFRA = {"kafka-1", "kafka-2", "kafka-3", "postgres", "schema-registry", "otel-collector", "jaeger", "prometheus",
         "grafana"}


def test_all_expected_services_are_defined():
    assert INFRA | FLYWHEEL | {"flywheel-init"} <= set(SERVICES)


def test_every_service_has_an_image_and_a_healthcheck():
    for name, svc in SERVICES.items():
        assert svc.get("image"), f"{name} has no image"
        if name == "flywheel-init":
            assert svc["restart"] == "no"
            continue
        check = svc.get("healthcheck")
        assert check and check.get("test") and not check.get("disable"), f"{name} has no healthcheck"
        assert check.get("retries", 0) >= 3, name


def test_kafka_is_a_three_broker_kraft_quorum():
    voters = {SERVICES[f"kafka-{i}"]["environment"]["KAFKA_CONTROLLER_QUORUM_VOTERS"] for i in (1, 2, 3)}
    assert voters == {"1@kafka-1:9093,2@kafka-2:9093,3@kafka-3:9093"}
    ids = {SERVICES[f"kafka-{i}"]["environment"]["KAFKA_NODE_ID"] for i in (1, 2, 3)}
    assert ids == {1, 2, 3}
    for i in (1, 2, 3):
        env = SERVICES[f"kafka-{i}"]["environment"]
        assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
        assert env["KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR"] == 3
        assert SERVICES[f"kafka-{i}"]["image"].startswith("apache/kafka:3.9")


def test_dependencies_exist_and_wait_for_health():
    for name, svc in SERVICES.items():
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert dep in SERVICES, f"{name} depends on unknown {dep}"
            expected = "service_completed_successfully" if dep == "flywheel-init" else "service_healthy"
            assert cond["condition"] == expected, f"{name} -> {dep}"
    for name in FLYWHEEL:
        assert "flywheel-init" in SERVICES[name]["depends_on"], name
    init_deps = set(SERVICES["flywheel-init"]["depends_on"])
    assert {"kafka-1", "kafka-2", "kafka-3", "postgres", "schema-registry"} <= init_deps


def test_published_ports_do_not_collide():
    published = []
    for svc in SERVICES.values():
        for port in svc.get("ports", []):
            published.append(str(port).split(":")[0])
    assert len(published) == len(set(published)), published
    assert "8080" in published and "3000" in published and "16686" in published


def test_flywheel_services_point_at_the_compose_services():
    for name in FLYWHEEL:
        env = SERVICES[name]["environment"]
        assert env["FLYWHEEL_KAFKA_BOOTSTRAP"].count("kafka-") == 3
        assert "@postgres:5432/" in env["FLYWHEEL_DATABASE_URL"]
        assert env["FLYWHEEL_SCHEMA_REGISTRY_URL"] == "http://schema-registry:8081"
        assert env["FLYWHEEL_OTLP_ENDPOINT"].startswith("http://otel-collector:")


def test_mounted_files_exist_and_parse():
    for svc in SERVICES.values():
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (COMPOSE / source).exists(), source
    prometheus = yaml.safe_load((COMPOSE / "prometheus.yml").read_text())
    targets = {t.split(":")[0] for job in prometheus["scrape_configs"] for sc in job["static_configs"]
               for t in sc["targets"]}
    assert targets == FLYWHEEL
    otel = yaml.safe_load((COMPOSE / "otel-collector.yaml").read_text())
    assert otel["service"]["pipelines"]["traces"]["exporters"] == ["otlp/jaeger"]
    dashboard = json.loads((COMPOSE / "grafana" / "dashboards" / "flywheel.json").read_text())
    assert len(dashboard["panels"]) >= 8


def test_grafana_panels_use_metrics_the_services_export():
    from prometheus_client import REGISTRY

    import infra.telemetry as telemetry  # noqa: F401  (registers the service metrics)
    import streams.dlq  # noqa: F401
    exported = {m.name for m in REGISTRY.collect()}
    dashboard = json.loads((COMPOSE / "grafana" / "dashboards" / "flywheel.json").read_text())
    import re
    for p in dashboard["panels"]:
        for target in p["targets"]:
            for metric in re.findall(r"flywheel_[a-z_]+", target["expr"]):
                base = re.sub(r"_(bucket|total|count|sum)$", "", metric)
                assert base in exported, f"panel {p['title']!r} uses unknown metric {metric}"


def test_dockerfile_builds_from_the_repository_layout():
    dockerfile = (COMPOSE / "Dockerfile").read_text()
    root = COMPOSE.parent
    for line in dockerfile.splitlines():
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (root / source).exists(), source
