"""The supervisor against real child processes: exit codes, cancel, fencing, parent death."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from worker.supervisor import run_supervised

PY = sys.executable


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); look at its state.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except FileNotFoundError:
        return False
    return state != "Z"


def _wait_dead(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return False


def _wait_file(path: Path, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return path.read_text().strip()
        time.sleep(0.05)
    raise AssertionError(f"{path} never written")


def _sleeper_with_grandchild(pidfile: Path) -> list[str]:
    """A child that starts a grandchild and records both pids, then sleeps."""
    code = textwrap.dedent(
        f"""
        import os, subprocess, sys, time
        g = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        open({str(pidfile)!r}, "w").write(f"{{os.getpid()}} {{g.pid}}")
        time.sleep(120)
        """
    )
    return [PY, "-c", code]


def test_exit_code_is_reported():
    out = run_supervised(
        [PY, "-c", "import sys; sys.exit(3)"],
        heartbeat=lambda: True,
        should_cancel=lambda: False,
        heartbeat_interval_s=0.1,
    )
    assert out.returncode == 3
    assert not out.cancelled and not out.fenced


def test_heartbeat_called_while_running(tmp_path):
    beats = []
    out = run_supervised(
        [PY, "-c", "import time; time.sleep(1.0)"],
        heartbeat=lambda: beats.append(time.monotonic()) or True,
        should_cancel=lambda: False,
        heartbeat_interval_s=0.2,
        poll_interval_s=0.05,
    )
    assert out.returncode == 0
    assert len(beats) >= 3


def test_cancel_kills_whole_group(tmp_path):
    pidfile = tmp_path / "pids"
    out = run_supervised(
        _sleeper_with_grandchild(pidfile),
        heartbeat=lambda: True,
        should_cancel=lambda: pidfile.exists() and bool(pidfile.read_text().strip()),
        heartbeat_interval_s=0.1,
        grace_s=2.0,
    )
    child, grandchild = map(int, pidfile.read_text().split())
    assert out.cancelled and not out.fenced
    assert out.returncode != 0
    assert _wait_dead(child) and _wait_dead(grandchild)


def test_child_ignoring_sigterm_is_killed_after_grace(tmp_path):
    ready = tmp_path / "ready"
    code = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
        f"open({str(ready)!r}, 'w').write('1'); time.sleep(120)"
    )
    t0 = time.monotonic()
    out = run_supervised(
        [PY, "-c", code],
        heartbeat=lambda: True,
        should_cancel=ready.exists,
        heartbeat_interval_s=0.1,
        grace_s=0.5,
    )
    assert out.cancelled
    assert out.returncode == -signal.SIGKILL
    assert time.monotonic() - t0 < 30


def test_lost_claim_fences_the_child(tmp_path):
    calls = {"n": 0}

    def beat() -> bool:
        calls["n"] += 1
        return calls["n"] < 3  # the third heartbeat finds another attempt owns the job

    out = run_supervised(
        [PY, "-c", "import time; time.sleep(120)"],
        heartbeat=beat,
        should_cancel=lambda: False,
        heartbeat_interval_s=0.1,
        grace_s=1.0,
    )
    assert out.fenced and not out.cancelled
    assert calls["n"] == 3


def test_child_dies_with_sigkilled_supervisor(tmp_path):
    """A supervisor killed with SIGKILL takes its child along (parent-death signal)."""
    pidfile = tmp_path / "pids"
    code = textwrap.dedent(
        f"""
        import sys, textwrap
        from worker.supervisor import run_supervised
        child = textwrap.dedent('''
            import os, time
            open({str(pidfile)!r}, "w").write(str(os.getpid()))
            time.sleep(120)
        ''')
        run_supervised([sys.executable, "-c", child], heartbeat=lambda: True,
                       should_cancel=lambda: False, heartbeat_interval_s=0.1)
        """
    )
    sup = subprocess.Popen([PY, "-c", code], cwd=Path(__file__).resolve().parents[2])
    try:
        child = int(_wait_file(pidfile))
        assert _alive(child)
        sup.kill()
        sup.wait(timeout=10)
        assert _wait_dead(child), "child outlived its SIGKILLed supervisor"
    finally:
        if sup.poll() is None:
            sup.kill()


def test_log_is_written(tmp_path):
    log = tmp_path / "child.log"
    out = run_supervised(
        [PY, "-c", "print('hello from child')"],
        heartbeat=lambda: True,
        should_cancel=lambda: False,
        log_path=log,
    )
    assert out.returncode == 0
    assert "hello from child" in log.read_text()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux-only")
def test_pdeathsig_is_set(tmp_path):
    """The child's /proc status shows the parent-death signal the supervisor asked for."""
    out_file = tmp_path / "sig"
    code = (
        "import ctypes; libc = ctypes.CDLL('libc.so.6'); v = ctypes.c_int();"
        "libc.prctl(2, ctypes.byref(v)); "  # PR_GET_PDEATHSIG
        f"open({str(out_file)!r}, 'w').write(str(v.value))"
    )
    run_supervised([PY, "-c", code], heartbeat=lambda: True, should_cancel=lambda: False)
    assert int(out_file.read_text()) == signal.SIGTERM


def test_a_hanging_child_is_stopped_after_max_runtime(tmp_path):
    """A hung child (an NCCL call, a deadlocked data loader) keeps the supervisor heartbeating,
    so without a wall-clock limit nothing ever stopped it and it held the GPU worker forever."""
    pidfile = tmp_path / "pids"
    t0 = time.monotonic()
    out = run_supervised(
        _sleeper_with_grandchild(pidfile),
        heartbeat=lambda: True,
        should_cancel=lambda: False,
        heartbeat_interval_s=0.1,
        grace_s=1.0,
        max_runtime_s=1.0,
    )
    child, grandchild = map(int, pidfile.read_text().split())
    assert out.timed_out and not out.cancelled and not out.fenced
    assert out.returncode == -signal.SIGTERM
    assert 1.0 <= out.seconds < 10 and time.monotonic() - t0 < 10
    assert _wait_dead(child) and _wait_dead(grandchild)


def test_a_child_ignoring_sigterm_past_max_runtime_is_killed(tmp_path):
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)"
    out = run_supervised([PY, "-c", code], heartbeat=lambda: True, should_cancel=lambda: False,
                         heartbeat_interval_s=0.1, grace_s=0.5, max_runtime_s=0.5)
    assert out.timed_out and out.returncode == -signal.SIGKILL and out.seconds < 10


def test_a_child_within_max_runtime_is_not_timed_out():
    out = run_supervised([PY, "-c", "import sys; sys.exit(2)"], heartbeat=lambda: True,
                         should_cancel=lambda: False, heartbeat_interval_s=0.1, max_runtime_s=30)
    assert out.returncode == 2 and not out.timed_out


def test_a_cancel_is_polled_more_often_than_the_heartbeat(tmp_path):
    """An evaluation child cannot poll a stop itself, and its heartbeat runs every 10 s: with
    cancel_poll_interval_s the supervisor sees a rejection within that, not a heartbeat later."""
    asked_at: list[float] = []
    beats: list[float] = []
    t0 = time.monotonic()

    def cancel() -> bool:
        asked_at.append(time.monotonic())
        return time.monotonic() - t0 > 0.5

    out = run_supervised([PY, "-c", "import time; time.sleep(120)"],
                         heartbeat=lambda: beats.append(1) or True, should_cancel=cancel,
                         heartbeat_interval_s=60.0, cancel_poll_interval_s=0.1, grace_s=2.0)
    assert out.cancelled and not out.fenced and out.seconds < 5
    assert len(beats) == 1 and len(asked_at) >= 3
