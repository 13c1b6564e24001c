"""Supervise Flywheel's processes on one machine (``flywheel up`` and ``flywheel demo``).

Each child is a ``flywheel <command>`` process in its own process group, with its output in
``<home>/logs/<name>.log``. A child that exits while the supervisor is running is restarted with
exponential back-off (1 s, 2 s, 4 s ... capped at 30 s; the back-off resets after a minute of
healthy running). Stopping sends SIGTERM to every child, waits, then SIGKILLs stragglers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChildSpec:
    name: str
    args: tuple[str, ...]
    """Arguments after ``flywheel``, e.g. ("worker", "--model", "smollm2-135m")."""
    env: dict[str, str] = field(default_factory=dict)
    command: tuple[str, ...] | None = None
    """A full command line instead of ``flywheel <args>`` (anything else worth supervising)."""

    def argv(self) -> list[str]:
        return list(self.command) if self.command else [sys.executable, "-m", "flywheel.cli", *self.args]


@dataclass
class Child:
    spec: ChildSpec
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restarts: int = 0
    backoff_s: float = 1.0
    next_start: float = 0.0


class Supervisor:
    def __init__(self, children: list[ChildSpec], log_dir: Path, base_env: dict[str, str] | None = None,
                 stop_timeout_s: float = 20.0) -> None:
        self.children = {spec.name: Child(spec) for spec in children}
        self.log_dir = log_dir
        self.base_env = dict(os.environ if base_env is None else base_env)
        self.stop_timeout_s = stop_timeout_s
        self.stopping = False

    def _spawn(self, child: Child) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        out = open(self.log_dir / f"{child.spec.name}.log", "ab")  # noqa: SIM115 - owned by the child
        env = {**self.base_env, **child.spec.env, "PYTHONUNBUFFERED": "1"}
        child.process = subprocess.Popen(child.spec.argv(), env=env,
                                         stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        out.close()
        child.started_at = time.monotonic()
        log.info("started %s (pid %d)", child.spec.name, child.process.pid)

    def add(self, spec: ChildSpec) -> None:
        """Supervise one more child (e.g. another worker replica) and start it now."""
        if spec.name in self.children:
            raise ValueError(f"a child named {spec.name!r} already exists")
        self.children[spec.name] = Child(spec)
        self._spawn(self.children[spec.name])

    def start_all(self) -> None:
        for child in self.children.values():
            self._spawn(child)

    def check(self) -> list[str]:
        """Restart children that exited (respecting back-off); returns the names restarted."""
        restarted = []
        now = time.monotonic()
        for child in self.children.values():
            proc = child.process
            if proc is None or proc.poll() is None:
                if proc is not None and now - child.started_at > 60:
                    child.backoff_s = 1.0
                continue
            if self.stopping:
                continue
            if child.next_start == 0.0:
                child.next_start = now + child.backoff_s
                log.warning("%s exited with %s; restarting in %.0fs", child.spec.name, proc.returncode,
                            child.backoff_s)
            if now >= child.next_start:
                child.restarts += 1
                child.backoff_s = min(child.backoff_s * 2, 30.0)
                child.next_start = 0.0
                self._spawn(child)
                restarted.append(child.spec.name)
        return restarted

    def status(self) -> dict[str, dict[str, object]]:
        return {name: {"pid": c.process.pid if c.process else None,
                       "alive": bool(c.process and c.process.poll() is None), "restarts": c.restarts}
                for name, c in self.children.items()}

    def pid_of(self, name: str) -> int | None:
        child = self.children[name]
        return child.process.pid if child.process and child.process.poll() is None else None

    def stop_all(self) -> None:
        self.stopping = True
        live = [c.process for c in self.children.values() if c.process and c.process.poll() is None]
        for proc in live:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout_s
        for proc in live:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)

    async def run(self, stop: asyncio.Event, interval_s: float = 0.5) -> None:
        """Start everything, keep it running until ``stop`` is set, then stop everything."""
        self.start_all()
        try:
            while not stop.is_set():
                self.check()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), interval_s)
        finally:
            await asyncio.to_thread(self.stop_all)
