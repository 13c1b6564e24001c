"""Is a local TCP port free for a server to listen on, and if not, who holds it?

Used before the local broker and the embedded Postgres start, so a port that another process
holds (say another developer's broker) is reported as exactly that, with the setting that moves
ours, instead of as a server that died with a log tail.
"""

from __future__ import annotations

import contextlib
import errno
import socket
import time
from pathlib import Path

from core.errors import FatalError


class PortTaken(FatalError):
    """A port a local service needs is held by another process (the caller moves the port)."""

    def __init__(self, port: int, service: str, setting: str, advice: str = "") -> None:
        holder = port_holder(port)
        who = f" by {holder}" if holder else " by another process"
        message = (f"cannot start {service}: port {port} is already in use{who}. Stop that process, or "
                   f"choose another port with {setting}=<free port>{advice}.")
        super().__init__(message)
        self.port, self.service, self.setting = port, service, setting


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """True when a server could bind ``host:port`` now (SO_REUSEADDR, as Kafka and Postgres bind)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def require_free(port: int, service: str, setting: str, advice: str = "", grace_s: float = 5.0) -> None:
    """Raise :class:`PortTaken` unless ``port`` is free on the loopback interface.

    A server killed a moment ago leaves its accepted connections closing (FIN_WAIT, LAST_ACK):
    they make a probing bind fail although nothing listens and the next server binds fine. So
    when Linux shows no listener on the port, the port counts as free. A killed multi-threaded
    server (the JVM) is reported dead before its last thread has closed the listening socket,
    so we wait up to ``grace_s`` before calling the port taken.
    """
    deadline = time.monotonic() + grace_s
    while True:
        if port_free(port) or port_listening(port) is False:
            return
        if time.monotonic() >= deadline:
            raise PortTaken(port, service, setting, advice)
        time.sleep(0.25)  # a killed server's threads may still be closing its listening socket


def _listening_inodes(port: int) -> set[str] | None:
    """Socket inodes in LISTEN state on ``port``; None when /proc/net is not there to ask."""
    inodes: set[str] = set()
    readable = False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            lines = Path(table).read_text().splitlines()[1:]
            readable = True
            for line in lines:
                fields = line.split()
                if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(fields[9])  # 0A = LISTEN
    return inodes if readable else None


def port_listening(port: int) -> bool | None:
    """Whether some socket listens on ``port`` (None when this system cannot tell)."""
    inodes = _listening_inodes(port)
    return None if inodes is None else bool(inodes)


def port_holder(port: int) -> str | None:
    """``pid N (name)`` of the process listening on ``port``, when Linux /proc lets us see it."""
    inodes = _listening_inodes(port)
    if not inodes:
        return None
    wanted = {f"socket:[{inode}]" for inode in inodes}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in (proc / "fd").iterdir():
                with contextlib.suppress(OSError):
                    if str(fd.readlink()) in wanted:
                        name = (proc / "comm").read_text().strip()
                        return f"pid {proc.name} ({name})"
    return None
