"""Run a training child process under a supervisor that fences, heartbeats, cancels it and
stops it past a time limit.

The Celery task is only a supervisor (ARCHITECTURE.md, "Celery GPU workers"): the training runs
in a child so that its exit frees all GPU memory and it can span several GPUs under
`accelerate launch`. The child gets its own process group, so a cancel reaches every process it
started, and a parent-death signal, so it cannot outlive a supervisor killed with SIGKILL and
keep writing as a zombie attempt.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class ChildOutcome:
    returncode: int
    #: Stopped because ``should_cancel`` said so.
    cancelled: bool
    #: Stopped because ``heartbeat`` reported the claim lost (a newer attempt owns the job).
    fenced: bool
    seconds: float
    #: Stopped because it ran longer than ``max_runtime_s`` (a hung NCCL call or data loader
    #: keeps the supervisor heartbeating, so nothing else would ever stop it).
    timed_out: bool = False


def _die_with_parent() -> None:
    """preexec hook: ask the kernel to SIGTERM the child when the supervisor dies."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def stop_group(proc: subprocess.Popen, grace_s: float) -> int:
    """SIGTERM the child's whole process group, then SIGKILL whatever is left after ``grace_s``."""
    pgid = proc.pid  # start_new_session makes the child its group leader
    _signal_group(pgid, signal.SIGTERM)
    try:
        rc = proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        _signal_group(pgid, signal.SIGKILL)
        rc = proc.wait()
    # Grandchildren may survive their leader; make sure none keeps the GPU.
    _signal_group(pgid, signal.SIGKILL)
    return rc


def run_supervised(
    argv: Sequence[str],
    *,
    heartbeat: Callable[[], bool],
    should_cancel: Callable[[], bool],
    heartbeat_interval_s: float = 10.0,
    poll_interval_s: float = 0.2,
    grace_s: float = 30.0,
    env: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
    log_path: str | Path | None = None,
    max_runtime_s: float | None = None,
    cancel_poll_interval_s: float | None = None,
) -> ChildOutcome:
    """Start ``argv`` and watch it until it exits, is cancelled, loses its claim, or times out.

    ``heartbeat`` is called every ``heartbeat_interval_s`` (and once at start); it returns False
    when the job row no longer carries this attempt's token, and the child is then stopped so a
    stale attempt never writes over a newer one. ``should_cancel`` is polled every
    ``cancel_poll_interval_s`` (None: with each heartbeat; shorter where the child cannot
    poll a cancel itself, as an evaluation cannot); a cancel stops the child group with
    SIGTERM, then SIGKILL after ``grace_s``.
    A child still running ``max_runtime_s`` after its start (None or 0: no limit) is stopped
    the same way and reported ``timed_out``.
    """
    started = time.monotonic()
    deadline = started + max_runtime_s if max_runtime_s else None
    log = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
    try:
        proc = subprocess.Popen(
            list(argv),
            env=dict(env) if env is not None else None,
            cwd=cwd,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
    finally:
        if log_path:
            log.close()

    poll_every = cancel_poll_interval_s or heartbeat_interval_s
    next_beat = next_poll = 0.0
    try:
        while True:
            rc = proc.poll()
            if rc is not None:
                return ChildOutcome(rc, False, False, time.monotonic() - started)
            now = time.monotonic()
            if now >= next_beat:
                next_beat = now + heartbeat_interval_s
                if not heartbeat():
                    rc = stop_group(proc, grace_s)
                    return ChildOutcome(rc, False, True, time.monotonic() - started)
            if now >= next_poll:
                next_poll = now + poll_every
                if should_cancel():
                    rc = stop_group(proc, grace_s)
                    return ChildOutcome(rc, True, False, time.monotonic() - started)
            if deadline is not None and now >= deadline:
                rc = stop_group(proc, grace_s)
                return ChildOutcome(rc, False, False, time.monotonic() - started, timed_out=True)
            time.sleep(poll_interval_s)
    except BaseException:
        # The supervisor itself is going down (worker shutdown, an exception in a callback):
        # never leave the child running without a supervisor.
        stop_group(proc, grace_s=min(grace_s, 5.0))
        raise
