"""Re-run a failed or cancelled training job: the same row goes back to ``queued``.

The row keeps what makes it this job: its frozen data selection, λD/λU, parameters, π_ref
snapshot, output folder (so the next attempt resumes from the newest resume state left in
``checkpoints/``, or starts over when retention removed them), ``requested_by`` and
``started_at``. It gets a fresh budget of ``PROSPECT_JOB_MAX_ATTEMPTS`` attempts; the run
state (cancel flag, attempt token, worker, heartbeat, result, error, finish time) is reset,
and how the previous run ended goes into ``retry_history`` with the key that asked.

Refused (409) when the job is not failed/cancelled, the line already has an active job (the
same partial unique index as creation), the job has a registered checkpoint, or its π_ref
snapshot is gone (retention deleted it, or it failed) or no longer what the line serves.
Concurrent retries of one job: the UPDATE is conditional on the status and ``retries`` read,
so exactly one wins.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Engine, select, update
from sqlalchemy.exc import IntegrityError

from service.errors import ApiError
from service.jobs import JobRefused, active_job, get_job, line_busy
from service.models import checkpoints as ck
from service.models import reference_snapshots as rs
from service.models import training_jobs as tj
from service.settings import Settings

RETRYABLE = ("failed", "cancelled")
#: retry_history keeps this many runs (newest), each error's last characters.
HISTORY_LIMIT = 20
HISTORY_ERROR_LIMIT = 4000

log = logging.getLogger("prospect.jobs")


def _not_retryable(job_id: int, status: str) -> ApiError:
    return ApiError(409, "job_not_retryable",
                    f"job {job_id} is {status}: only a failed or cancelled job can be retried",
                    [{"field": "job_id", "message": f"job is {status}"}])


def history_entry(job: dict[str, Any], retried_by: int | None, now: datetime) -> dict[str, Any]:
    """How the run before this retry ended (the columns the retry resets)."""
    finished = job["finished_at"]
    return {"retry": int(job["retries"]) + 1, "status": job["status"],
            "error": (job["error"] or "")[-HISTORY_ERROR_LIMIT:] or None,
            "attempt": job["attempt"], "step": job["step"],
            "finished_at": finished.isoformat() if finished else None,
            "retried_at": now.isoformat(), "retried_by": retried_by}


def _check_reference(conn: Connection, settings: Settings, job: dict[str, Any]) -> None:
    """The job's π_ref must still exist and be what the line serves (as at creation).

    Called after the job row was set queued, in the same transaction: the snapshot row is
    locked (Postgres), and retention locks it too before deciding it is unneeded, so either
    retention deleted it first (seen here: refused) or it sees this job active (kept)."""
    from service.registry import production_source

    snap_id = job["reference_snapshot_id"]
    if snap_id is None:  # it failed before its π_ref was taken: the worker takes one
        return
    snap = conn.execute(select(rs.c.status, rs.c.source).where(rs.c.id == snap_id)
                        .with_for_update()).first()
    if snap is None or snap.status != "ready":
        state = "gone" if snap is None else snap.status
        raise JobRefused("reference_unavailable",
                         f"job {job['id']} cannot run again: its π_ref snapshot {snap_id} is "
                         f"{state}; start a new job", "reference_snapshot_id",
                         {"reference_snapshot_id": snap_id})
    if snap.source != production_source(conn, settings, job["line"]):
        raise JobRefused("reference_stale",
                         f"job {job['id']} trained against π_ref snapshot {snap_id}, and line "
                         f"{job['line']!r} has served another model since; start a new job",
                         "reference_snapshot_id", {"reference_snapshot_id": snap_id})


def retry_job(engine: Engine, settings: Settings, job_id: int, *,
              retried_by: int | None = None) -> dict[str, Any]:
    """Queue a failed or cancelled job again (the caller sends its task, as for a new job)."""
    try:
        with engine.begin() as conn:
            job = get_job(conn, job_id)
            if job["status"] not in RETRYABLE:
                raise _not_retryable(job_id, job["status"])
            if conn.execute(select(ck.c.id).where(ck.c.job_id == job_id).limit(1)).first():
                raise ApiError(409, "job_has_checkpoint",
                               f"job {job_id} already has a registered checkpoint",
                               [{"field": "job_id", "message": "has a checkpoint"}])
            busy = active_job(conn, job["line"])
            if busy is not None:
                raise line_busy(job["line"], busy["id"])
            now = datetime.now(UTC)
            history = [*(job["retry_history"] or []), history_entry(job, retried_by, now)]
            # The write comes first: on SQLite it takes the write lock before the π_ref check
            # reads, and on Postgres it holds the row while the snapshot row is locked.
            won = conn.execute(update(tj).where(
                tj.c.id == job_id, tj.c.status == job["status"], tj.c.retries == job["retries"],
            ).values(
                status="queued", retries=tj.c.retries + 1, retry_history=history[-HISTORY_LIMIT:],
                max_attempts=int(job["attempt"]) + settings.job_max_attempts,
                cancel_requested=False, attempt_token=None, worker_host=None, heartbeat_at=None,
                enqueued_at=None, finished_at=None, result=None, error=None,
            )).rowcount
            if won != 1:  # another retry (or whatever changed the row) came first
                raise _not_retryable(job_id, get_job(conn, job_id)["status"])
            _check_reference(conn, settings, job)
            row = get_job(conn, job_id)
    except IntegrityError:
        # The partial unique index: another job of the line became active meanwhile.
        with engine.connect() as conn:
            busy = active_job(conn, job["line"])
        if busy is None or busy["id"] == job_id:
            raise JobRefused("conflict", f"job {job_id} changed while it was retried; retry",
                             "job_id", {}) from None
        raise line_busy(job["line"], busy["id"]) from None
    log.info("job retried", extra={"job_id": job_id, "key_id": retried_by,
                                   "retry": row["retries"], "previous_status": job["status"]})
    return row
