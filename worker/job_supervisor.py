"""What the Celery `train` task does: claim the job row, make sure it has a π_ref snapshot,
run the training child under worker/supervisor.py, and settle the row when the child ends.

The claim is a conditional UPDATE (service.jobs.claim): a redelivered or duplicated message
finds the job running or finished and returns at once, so no message can start a second run.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import socket
import sys
from pathlib import Path

from sqlalchemy import Engine
from sqlalchemy import exc as sa_exc

from service import jobs
from service.settings import Settings
from worker.heartbeat import heartbeating
from worker.job_child import EXIT_FENCED, EXIT_INTERRUPTED
from worker.references import current_reference
from worker.supervisor import run_supervised

log = logging.getLogger("prospect.supervisor")


def settings_env(settings: Settings) -> dict[str, str]:
    """PROSPECT_* variables that rebuild ``settings`` in the child process."""
    env: dict[str, str] = {}
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if value is None:
            text = "null"  # explicit: the child must not fall back to a non-None default
        elif isinstance(value, (dict, list)):
            text = json.dumps(value)
        elif isinstance(value, bool):
            text = "true" if value else "false"
        else:
            text = str(value)
        env[f"PROSPECT_{name.upper()}"] = text
    return env


def child_argv(settings: Settings, job_id: int, token: str) -> list[str]:
    args = ["-m", "worker.job_child", "--job-id", str(job_id), "--token", token]
    if settings.train_launcher == "accelerate":
        return [sys.executable, "-m", "accelerate.commands.launch",
                *shlex.split(settings.accelerate_args), *args]
    return [sys.executable, *args]


def _log_tail(path: Path, limit: int = 4000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - limit))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def timeout_error(settings: Settings, out: Path, log_path: Path) -> str:
    """The failed job's error when its attempt ran past ``job_max_runtime_s``.

    A timeout fails the job for good instead of leaving it to the reconciler's re-queue: each
    re-queued attempt would get the full limit again, so a hang that repeats (a bad NCCL setup,
    a deadlocking loader) would hold the GPU for ``job_max_attempts`` times the limit and end
    as "worker lost", hiding the cause. Failing is what the state machine already does with a
    child that ends without settling its row; the resume states in ``checkpoints/`` stay.
    """
    return (f"training stopped: the attempt ran longer than PROSPECT_JOB_MAX_RUNTIME_S="
            f"{settings.job_max_runtime_s:g}s (a hung process, or a run that needs a higher "
            f"limit); resume states, if any, stay in {out / 'checkpoints'}; log tail:\n"
            f"{_log_tail(log_path)}")


def supervise(job_id: int, settings: Settings, engine: Engine) -> str:
    """Run one attempt of ``job_id``; returns what happened, for the worker log."""
    claim = jobs.claim(engine, job_id, socket.gethostname(), settings)
    if claim is None:
        log.info("job %s is not claimable (already running, finished or cancelled)", job_id)
        return "skipped"
    log.info("job %s: attempt %s claimed", job_id, claim.attempt)
    try:
        with engine.connect() as conn:
            job = jobs.get_job(conn, job_id)
        if job["reference_snapshot_id"] is None:
            # taking π_ref can mean a download, a hash and a copy of a whole model: without a
            # heartbeat meanwhile the reconciler takes the silence for a lost worker
            with heartbeating(lambda: jobs.heartbeat(engine, claim), settings.heartbeat_interval_s,
                              f"job-{claim.job_id}"):
                snap = current_reference(engine, settings, job["line"])
            if not jobs.set_reference(engine, claim, snap["id"]):
                return "fenced"
        out = Path(job["output_dir"])
        (out / "logs").mkdir(parents=True, exist_ok=True)
        log_path = out / "logs" / f"attempt-{claim.attempt}.log"

        def beat() -> bool:
            try:
                return jobs.heartbeat(engine, claim)
            except sa_exc.SQLAlchemyError as exc:  # a database blip must not kill the run
                log.warning("job %s: heartbeat failed: %s", job_id, exc)
                return True

        def cancelled() -> bool:
            try:
                return jobs.cancel_requested(engine, job_id)
            except sa_exc.SQLAlchemyError:
                return False

        outcome = run_supervised(
            child_argv(settings, job_id, claim.token),
            heartbeat=beat, should_cancel=cancelled,
            heartbeat_interval_s=settings.heartbeat_interval_s, grace_s=settings.cancel_grace_s,
            env={**os.environ, **settings_env(settings), "PYTHONUNBUFFERED": "1"},
            log_path=log_path, max_runtime_s=settings.job_max_runtime_s or None,
        )
    except Exception as exc:
        jobs.finish(engine, claim, "failed", error=f"{type(exc).__name__}: {exc}")
        raise
    if outcome.fenced or outcome.returncode == EXIT_FENCED:
        log.warning("job %s: attempt %s lost its claim; stopped", job_id, claim.attempt)
        return "fenced"
    with engine.connect() as conn:
        job = jobs.get_job(conn, job_id)
    if job["status"] != "running" or job["attempt_token"] != claim.token:
        return str(job["status"])
    # The child ended without settling the row.
    if outcome.cancelled or jobs.cancel_requested(engine, job_id):
        jobs.finish(engine, claim, "cancelled", error="cancelled by request")
        return "cancelled"
    if outcome.timed_out:
        # checked before EXIT_INTERRUPTED: a child that saved a checkpoint on the SIGTERM
        # must not be left running for the reconciler to re-queue
        log.warning("job %s: attempt %s ran past PROSPECT_JOB_MAX_RUNTIME_S; stopped",
                    job_id, claim.attempt)
        jobs.finish(engine, claim, "failed", error=timeout_error(settings, out, log_path))
        return "failed"
    if outcome.returncode == EXIT_INTERRUPTED:
        # Stopped from outside (not a cancel) after saving a checkpoint: the heartbeat stops
        # with this return, and the reconciler re-queues the job within its timeout.
        return "interrupted"
    jobs.finish(engine, claim, "failed",
                error=f"training process exited with code {outcome.returncode}; log tail:\n"
                      f"{_log_tail(log_path)}")
    return "failed"


