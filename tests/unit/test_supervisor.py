import os
import signal
import sys
import time

from flywheel.supervisor import ChildSpec, Supervisor

SLEEPER = (sys.executable, "-c", "import time; time.sleep(120)")


def test_a_killed_child_is_restarted_and_stop_ends_everything(tmp_path):
    sup = Supervisor([ChildSpec("a", (), command=SLEEPER), ChildSpec("b", (), command=SLEEPER)], tmp_path)
    sup.start_all()
    try:
        first = sup.pid_of("a")
        assert first is not None
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while sup.pid_of("a") in (None, first) and time.monotonic() < deadline:
            sup.check()
            time.sleep(0.1)
        assert sup.pid_of("a") not in (None, first)
        assert sup.status()["a"]["restarts"] == 1 and sup.status()["b"]["restarts"] == 0
    finally:
        sup.stop_all()
    assert not any(s["alive"] for s in sup.status().values())
    sup.check()  # a stopping supervisor restarts nothing
    assert not any(s["alive"] for s in sup.status().values())


def test_backoff_grows_for_a_crash_looping_child(tmp_path):
    crash = ChildSpec("c", (), command=(sys.executable, "-c", "raise SystemExit(3)"))
    sup = Supervisor([crash], tmp_path)
    sup.start_all()
    try:
        deadline = time.monotonic() + 8
        while sup.children["c"].restarts < 2 and time.monotonic() < deadline:
            sup.check()
            time.sleep(0.05)
        assert sup.children["c"].restarts == 2
        assert sup.children["c"].backoff_s == 4.0  # 1 s, then 2 s, now 4 s before the next try
    finally:
        sup.stop_all()
    assert (tmp_path / "c.log").exists()
